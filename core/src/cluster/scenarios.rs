//! Runbook scenarios on the simulated cluster: what an operator does, what the nodes must show.
//!
//! Each test reads like the seeds' runbooks ("Start the node with up-to-date
//! data" to "Testing") and checks what `safekit state` and the module log
//! would show. Times are virtual; nothing sleeps.

use std::time::Duration;

use super::compare;
use super::generations::Verdict;
use super::heartbeat::Lan;
use super::machine::{
    Action, Command, DefaultPrim, Event, ReplicationRole, SecondPhase, State, WaitReason,
};
use super::sim::{PairOptions, Sim, ms};

const NODE1: usize = 0;
const NODE2: usize = 1;

fn check(sim: &Sim, node: usize, expected: State) {
    assert_eq!(sim.state(node), expected, "{}", sim.dump());
}

fn check_logged(sim: &Sim, node: usize, needle: &str) {
    assert!(
        sim.logged(node, needle),
        "{} did not log {needle:?}\n{}",
        sim.nodes[node].name,
        sim.dump()
    );
}

/// First start as the runbook says: both `start` (both WAIT), `prim` on node1, `second` on node2.
fn first_start(options: PairOptions) -> Sim {
    let mut sim = Sim::pair(options);
    sim.run_for(ms(5000));
    sim.command(NODE1, Command::Start);
    sim.command(NODE2, Command::Start);
    sim.drive();
    check(&sim, NODE1, State::Wait(WaitReason::NoUpToDateNode));
    check(&sim, NODE2, State::Wait(WaitReason::NoUpToDateNode));
    sim.command(NODE1, Command::Stop);
    sim.command(NODE1, Command::Prim);
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    sim
}

fn established_pair() -> Sim {
    first_start(PairOptions::default())
}

#[test]
fn first_start_both_wait_then_prim_on_node1_and_node2_resyncs_to_second() {
    let mut sim = Sim::pair(PairOptions::default());
    sim.run_for(ms(5000));
    sim.command(NODE1, Command::Start);
    sim.command(NODE2, Command::Start);
    sim.drive();
    check(&sim, NODE1, State::Wait(WaitReason::NoUpToDateNode));
    check(&sim, NODE2, State::Wait(WaitReason::NoUpToDateNode));
    assert!(!sim.nodes[NODE1].application_running && !sim.nodes[NODE2].application_running);

    // "If the cluster is in WAIT not uptodate, stop the WAIT node and force its start as primary."
    sim.command(NODE1, Command::Stop);
    sim.command(NODE1, Command::Prim);
    sim.run_for(ms(100));
    check(&sim, NODE1, State::Alone);
    assert!(sim.nodes[NODE1].vip && sim.nodes[NODE1].application_running);
    check_logged(&sim, NODE1, "Action prim called by root");
    check_logged(&sim, NODE1, "Forced start as primary");

    // node2, already started, sees node1 primary and resynchronizes in full (first start).
    sim.run_for(ms(1000));
    check(&sim, NODE2, State::Second(SecondPhase::Resyncing));
    let started = sim.nodes[NODE2]
        .actions
        .iter()
        .find(|(_, action)| {
            *action
                == Action::StartResync {
                    kind: super::ResyncKind::Full,
                }
        })
        .map(|(at, _)| *at);
    let Some(started) = started else {
        panic!("the first reintegration is a full copy\n{}", sim.dump())
    };
    // The simulated resync reports 50% halfway through its 2 s.
    sim.run_until(started + ms(1500));
    assert_eq!(
        sim.nodes[NODE2].machine.resync_percent(),
        50,
        "progress visible in state -v"
    );

    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    assert!(!sim.nodes[NODE2].vip && !sim.nodes[NODE2].application_running);
    assert_eq!(sim.nodes[NODE1].replication, ReplicationRole::Primary);
    assert_eq!(sim.nodes[NODE2].replication, ReplicationRole::Secondary);
    // Both now hold the same generation history.
    assert!(matches!(
        compare(
            &sim.nodes[NODE1].persisted.history,
            &sim.nodes[NODE2].persisted.history
        ),
        Verdict::Equal { .. }
    ));
}

#[test]
fn second_is_refused_when_the_peer_is_not_primary_and_prim_when_it_is() {
    let mut sim = Sim::pair(PairOptions::default());
    sim.run_for(ms(5000));
    sim.command(NODE2, Command::Second);
    sim.run_for(ms(10));
    check(&sim, NODE2, State::Stop);
    check_logged(&sim, NODE2, "REFUSED second: the peer node is not primary");

    let mut sim = established_pair();
    sim.command(NODE2, Command::Stop);
    sim.drive();
    sim.command(NODE2, Command::Prim);
    sim.run_for(ms(10));
    check(&sim, NODE2, State::Stop);
    check_logged(&sim, NODE2, "REFUSED prim: the peer node is primary");
}

#[test]
fn failover_on_power_loss_happens_at_timeout_not_before() {
    let mut sim = established_pair();
    let timeout = ms(3000);
    sim.run_for(ms(333));
    sim.crash(NODE1);
    // The last heartbeat node2 accepted from node1 is the failover clock's origin.
    let last_heard = sim.nodes[NODE2]
        .machine
        .lans()
        .iter()
        .filter_map(|lan| lan.last_seen)
        .max()
        .expect("node2 heard node1");
    sim.run_until(last_heard + timeout - ms(1));
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    sim.run_until(last_heard + timeout);
    check(&sim, NODE2, State::Alone);
    check_logged(&sim, NODE2, "Action alone called by heart: no heartbeat");
    let takeover = sim.nodes[NODE2]
        .machine
        .last_transition()
        .expect("a transition")
        .at;
    assert_eq!(
        takeover,
        last_heard + timeout,
        "failover exactly at timeout after the last heartbeat"
    );
    sim.drive();
    assert!(sim.nodes[NODE2].vip && sim.nodes[NODE2].application_running);
    assert_eq!(sim.nodes[NODE2].start_prim_runs, 1);
}

#[test]
fn failback_node1_restarts_resyncs_incrementally_and_the_application_never_stops_on_node2() {
    let mut sim = established_pair();
    sim.crash(NODE1);
    sim.drive();
    check(&sim, NODE2, State::Alone);
    let stops_before = sim.nodes[NODE2].stop_prim_runs;

    sim.restart_agent(NODE1);
    sim.run_for(ms(1000));
    sim.command(NODE1, Command::Start);
    sim.drive();
    check(&sim, NODE1, State::Second(SecondPhase::InSync));
    check(&sim, NODE2, State::Prim);
    assert_eq!(
        sim.nodes[NODE2].stop_prim_runs, stops_before,
        "application never stopped on node2"
    );
    assert!(sim.nodes[NODE2].application_running && sim.nodes[NODE2].vip);
    let incremental = sim.nodes[NODE1].actions.iter().any(|(_, action)| {
        matches!(
            action,
            Action::StartResync {
                kind: super::ResyncKind::Incremental { .. }
            }
        )
    });
    assert!(
        incremental,
        "failback is an incremental reintegration\n{}",
        sim.dump()
    );
}

#[test]
fn not_up_to_date_node_waits_alone_and_prim_forces_it_with_a_log_line() {
    let mut sim = established_pair();
    // Stop node2 (SECOND): node1 goes ALONE and keeps writing.
    sim.command(NODE2, Command::Stop);
    sim.drive();
    check(&sim, NODE2, State::Stop);
    check(&sim, NODE1, State::Alone);
    check_logged(&sim, NODE1, "Action alone called by heart: remote stop");
    // Stop node1, then power it off: node2 is on its own.
    sim.command(NODE1, Command::Stop);
    sim.drive();
    check(&sim, NODE1, State::Stop);
    sim.crash(NODE1);
    sim.command(NODE2, Command::Start);
    sim.drive();
    check(&sim, NODE2, State::Wait(WaitReason::NotUpToDate));
    assert!(
        !sim.nodes[NODE2].application_running,
        "never serves stale data"
    );
    check_logged(&sim, NODE2, "Data may be not uptodate");

    sim.command(NODE2, Command::Prim);
    sim.drive();
    check(&sim, NODE2, State::Alone);
    check_logged(
        &sim,
        NODE2,
        "Forced start as primary by root: data may not be up to date",
    );
}

#[test]
fn not_up_to_date_node_waits_for_a_stopped_peer_that_is_still_reachable() {
    let mut sim = established_pair();
    sim.command(NODE2, Command::Stop);
    sim.drive();
    sim.command(NODE1, Command::Stop);
    sim.drive();
    // node1's agent still runs (module STOP) and tells node2 its history.
    sim.command(NODE2, Command::Start);
    sim.drive();
    check(&sim, NODE2, State::Wait(WaitReason::NotUpToDate));
    // Starting node1 brings the cluster back: node1 primary, node2 resyncs.
    sim.command(NODE1, Command::Start);
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
}

#[test]
fn swap_exchanges_the_roles_without_a_new_generation() {
    let mut sim = established_pair();
    let history = sim.nodes[NODE1].persisted.history.clone();
    sim.command(NODE1, Command::Swap);
    sim.drive();
    check(&sim, NODE1, State::Second(SecondPhase::InSync));
    check(&sim, NODE2, State::Prim);
    assert!(sim.nodes[NODE2].vip && !sim.nodes[NODE1].vip);
    assert!(sim.nodes[NODE2].application_running && !sim.nodes[NODE1].application_running);
    assert_eq!(sim.nodes[NODE2].persisted.history, history);
    assert_eq!(sim.nodes[NODE1].persisted.history, history);

    // And back, asked on the SECOND this time.
    sim.command(NODE1, Command::Swap);
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    check_logged(&sim, NODE2, "Action swap called by the peer");
}

#[test]
fn failover_off_leaves_the_secondary_waiting() {
    let mut sim = first_start(PairOptions {
        failover: false,
        ..PairOptions::default()
    });
    sim.crash(NODE1);
    sim.drive();
    check(&sim, NODE2, State::Wait(WaitReason::FailoverOff));
    assert!(!sim.nodes[NODE2].application_running && !sim.nodes[NODE2].vip);
    check_logged(&sim, NODE2, "Failover-off configured");
    // Only prim promotes it.
    sim.command(NODE2, Command::Prim);
    sim.drive();
    check(&sim, NODE2, State::Alone);
}

#[test]
fn defaultprim_node1_swaps_back_after_reintegration() {
    let mut sim = first_start(PairOptions {
        defaultprim: DefaultPrim::Node("node1".into()),
        ..PairOptions::default()
    });
    sim.crash(NODE1);
    sim.drive();
    check(&sim, NODE2, State::Alone);
    sim.restart_agent(NODE1);
    sim.run_for(ms(1000));
    sim.command(NODE1, Command::Start);
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    check_logged(&sim, NODE2, "Transition SWAP from defaultprim");
    assert!(sim.nodes[NODE1].vip && !sim.nodes[NODE2].vip);
}

#[test]
fn defaultprim_alone_keeps_the_alone_node_primary() {
    let mut sim = established_pair();
    sim.crash(NODE1);
    sim.drive();
    sim.restart_agent(NODE1);
    sim.command(NODE1, Command::Start);
    sim.drive();
    check(&sim, NODE2, State::Prim);
    check(&sim, NODE1, State::Second(SecondPhase::InSync));
}

#[test]
fn split_brain_on_heal_exactly_one_primary_the_other_sets_aside_and_resyncs() {
    let mut sim = established_pair();
    sim.partition(NODE1, NODE2, None);
    sim.drive();
    check(&sim, NODE1, State::Alone);
    check(&sim, NODE2, State::Alone);
    let node1_history = sim.nodes[NODE1].persisted.history.clone();

    sim.heal();
    sim.drive();
    // node1 was PRIM when the link broke: it stays; node2 took over: it is sacrificed.
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    check_logged(&sim, NODE1, "Split brain recovery: staying alone");
    check_logged(&sim, NODE2, "Split brain recovery: exiting alone");
    let set_aside: Vec<_> = sim.nodes[NODE2]
        .actions
        .iter()
        .filter(|(_, action)| matches!(action, Action::SetAsideDivergedFiles { .. }))
        .collect();
    assert_eq!(set_aside.len(), 1, "{}", sim.dump());
    // The files were set aside before the resync started.
    let order: Vec<_> = sim.nodes[NODE2]
        .actions
        .iter()
        .filter(|(_, a)| {
            matches!(
                a,
                Action::SetAsideDivergedFiles { .. } | Action::StartResync { .. }
            )
        })
        .map(|(_, a)| matches!(a, Action::StartResync { .. }))
        .collect();
    assert_eq!(order.last(), Some(&true));
    assert_eq!(order.iter().filter(|resync| !**resync).count(), 1);
    assert!(!sim.nodes[NODE2].vip && !sim.nodes[NODE2].application_running);
    assert_eq!(
        sim.nodes[NODE2].persisted.history, node1_history,
        "node2 adopted the winner's history"
    );
}

#[test]
fn split_brain_rule_is_the_same_seen_from_both_nodes_when_both_were_started_alone() {
    // Two nodes forced primary during a partition (both Forced): the first name wins.
    let mut sim = Sim::pair(PairOptions::default());
    sim.partition(NODE1, NODE2, None);
    sim.run_for(ms(5000));
    sim.command(NODE1, Command::Prim);
    sim.command(NODE2, Command::Prim);
    sim.drive();
    check(&sim, NODE1, State::Alone);
    check(&sim, NODE2, State::Alone);
    sim.heal();
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
}

#[test]
fn production_lan_cut_with_a_flow_lan_alive_keeps_prim_second_and_reports_the_degraded_lan() {
    let lans = vec![
        Lan {
            name: "production".into(),
            flow: false,
        },
        Lan {
            name: "replication".into(),
            flow: true,
        },
    ];
    let mut sim = first_start(PairOptions {
        lans,
        ..PairOptions::default()
    });
    sim.partition(NODE1, NODE2, Some("production"));
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    for node in [NODE1, NODE2] {
        let lans = sim.nodes[node].machine.lans();
        let production = lans
            .iter()
            .find(|lan| lan.name == "production")
            .expect("configured");
        let replication = lans
            .iter()
            .find(|lan| lan.name == "replication")
            .expect("configured");
        assert!(!production.up && replication.up, "{lans:?}");
        check_logged(
            &sim,
            node,
            "Heartbeat on LAN production lost; the peer is still heard on another LAN",
        );
    }
    // Cutting the replication LAN too is a real peer loss.
    sim.partition(NODE1, NODE2, Some("replication"));
    sim.drive();
    check(&sim, NODE1, State::Alone);
    check(&sim, NODE2, State::Alone);
}

#[test]
fn one_way_cut_node2_hears_nothing_fails_over_and_split_brain_resolves_on_heal() {
    let mut sim = established_pair();
    sim.cut_one_way(NODE1, NODE2, None);
    sim.drive();
    // node2 no longer hears node1: it takes over. node1 still hears node2 ALONE: split brain at once.
    sim.heal();
    sim.drive();
    let primaries = [NODE1, NODE2]
        .iter()
        .filter(|node| matches!(sim.state(**node), State::Prim | State::Alone))
        .count();
    assert_eq!(primaries, 1, "{}", sim.dump());
    check(&sim, NODE1, State::Prim);
}

#[test]
fn a_resynchronizing_second_that_loses_its_peer_waits_and_never_becomes_primary() {
    let mut sim = Sim::pair(PairOptions::default());
    sim.resync_delay = ms(60_000);
    sim.run_for(ms(5000));
    sim.command(NODE1, Command::Prim);
    sim.run_for(ms(100));
    sim.command(NODE2, Command::Start);
    sim.run_for(ms(2000));
    check(&sim, NODE2, State::Second(SecondPhase::Resyncing));
    sim.crash(NODE1);
    sim.drive();
    check(&sim, NODE2, State::Wait(WaitReason::ResyncInterrupted));
    assert!(!sim.nodes[NODE2].application_running);
    // prim is refused: its data may be inconsistent.
    sim.command(NODE2, Command::Prim);
    sim.drive();
    check_logged(&sim, NODE2, "REFUSED prim: Data may be inconsistent");
    assert!(!matches!(sim.state(NODE2), State::Alone | State::Prim));
    // primforce is the way out, and forgets the shared history.
    sim.command(NODE2, Command::PrimForce);
    sim.drive();
    check(&sim, NODE2, State::Alone);
    assert_eq!(sim.nodes[NODE2].persisted.history.generations().len(), 1);
}

#[test]
fn stop_on_prim_makes_the_peer_alone_with_reason_remote_stop() {
    let mut sim = established_pair();
    sim.command(NODE1, Command::Stop);
    sim.drive();
    check(&sim, NODE1, State::Stop);
    check(&sim, NODE2, State::Alone);
    check_logged(&sim, NODE2, "Action alone called by heart: remote stop");
    assert!(!sim.nodes[NODE1].vip && sim.nodes[NODE2].vip);
    // node1 knows the peer took over: its next start is a reintegration, not a start alone.
    assert!(!sim.nodes[NODE1].persisted.up_to_date);
    sim.command(NODE1, Command::Start);
    sim.drive();
    check(&sim, NODE1, State::Second(SecondPhase::InSync));
    check(&sim, NODE2, State::Prim);
}

#[test]
fn replication_failure_with_heartbeats_alive_makes_the_primary_alone_and_the_peer_wait_then_retry()
{
    let lans = vec![
        Lan {
            name: "production".into(),
            flow: false,
        },
        Lan {
            name: "replication".into(),
            flow: true,
        },
    ];
    let mut sim = first_start(PairOptions {
        lans,
        ..PairOptions::default()
    });
    // The replication stream breaks (not the heartbeats): degraded.
    sim.deliver_event(NODE1, Event::ReplicationPeerLost);
    sim.run_for(ms(1000));
    check(&sim, NODE1, State::Alone);
    check(&sim, NODE2, State::Wait(WaitReason::ReplicationDegraded));
    assert!(sim.nodes[NODE1].application_running, "no failover");
    assert!(
        sim.nodes[NODE1]
            .machine
            .heartbeat_payload()
            .replication_degraded
    );
    // After `timeout`, node2 retries a reintegration (SafeKit needs a manual stop/start here).
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    check_logged(&sim, NODE2, "Reintegration started (incremental");
}

#[test]
fn witness_unreachable_on_peer_loss_means_wait_not_alone() {
    let mut sim = first_start(PairOptions {
        witness: true,
        ..PairOptions::default()
    });
    sim.deliver_event(NODE1, Event::WitnessReachable(true));
    sim.deliver_event(NODE2, Event::WitnessReachable(false));
    sim.partition(NODE1, NODE2, None);
    sim.drive();
    check(&sim, NODE1, State::Alone);
    check(&sim, NODE2, State::Wait(WaitReason::WitnessUnreachable));
    assert!(!sim.nodes[NODE2].application_running);
    sim.heal();
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
}

#[test]
fn restart_runs_the_scripts_and_keeps_the_state() {
    let mut sim = established_pair();
    sim.command(NODE1, Command::Restart);
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    assert_eq!(sim.nodes[NODE1].stop_prim_runs, 1);
    assert_eq!(sim.nodes[NODE1].start_prim_runs, 2);
    assert!(sim.nodes[NODE1].vip, "restart keeps the VIP");
}

#[test]
fn every_state_change_names_its_reason_and_operator_actions_name_the_caller() {
    let sim = established_pair();
    for node in &sim.nodes {
        for (_, action) in &node.actions {
            if let Action::StateChanged { reason, .. } = action {
                assert!(!reason.is_empty());
            }
        }
    }
    check_logged(&sim, NODE1, "Action start called by root");
    check_logged(&sim, NODE1, "Action stop called by root");
}

#[test]
fn restarting_the_agent_of_a_crashed_primary_during_takeover_never_gives_two_primaries() {
    // node1 crashes and its agent restarts before node2's timeout: node1 must not go ALONE.
    let mut sim = established_pair();
    sim.crash(NODE1);
    sim.run_for(ms(500));
    sim.restart_agent(NODE1);
    sim.command(NODE1, Command::Start);
    sim.drive();
    let running = [NODE1, NODE2]
        .iter()
        .filter(|node| matches!(sim.state(**node), State::Prim | State::Alone))
        .count();
    assert_eq!(running, 1, "{}", sim.dump());
    assert!(
        !sim.nodes
            .iter()
            .any(|n| n.log.iter().any(|l| l.contains("SET ASIDE"))),
        "{}",
        sim.dump()
    );
    let _ = Duration::ZERO;
}

#[test]
fn witness_unreachable_on_both_sides_means_neither_goes_alone() {
    let mut sim = first_start(PairOptions {
        witness: true,
        ..PairOptions::default()
    });
    sim.deliver_event(NODE1, Event::WitnessReachable(false));
    sim.deliver_event(NODE2, Event::WitnessReachable(false));
    sim.partition(NODE1, NODE2, None);
    sim.drive();
    for node in [NODE1, NODE2] {
        assert!(
            !sim.nodes[node].application_running && !sim.nodes[node].vip,
            "{}",
            sim.dump()
        );
    }
    check(&sim, NODE2, State::Wait(WaitReason::WitnessUnreachable));
    // The witness comes back for node2 only: node2 takes over; node1 stays out.
    sim.deliver_event(NODE2, Event::WitnessReachable(true));
    sim.drive();
    check(&sim, NODE2, State::Alone);
    assert!(
        !matches!(sim.state(NODE1), State::Alone | State::Prim),
        "{}",
        sim.dump()
    );
    sim.heal();
    sim.drive();
    check(&sim, NODE2, State::Prim);
    check(&sim, NODE1, State::Second(SecondPhase::InSync));
}

mod random_schedules {
    //! Random operator actions, crashes and partitions; the invariants that must hold whatever happens.

    use proptest::prelude::*;

    use super::super::heartbeat::Lan;
    use super::super::machine::{Action, Command, Event, SecondPhase, State, WaitReason};
    use super::super::sim::{PairOptions, Sim, ms};
    use super::super::{Verdict, compare};

    #[derive(Debug, Clone)]
    enum Step {
        Command(usize, Command),
        Crash(usize),
        RestartAgent(usize),
        Partition,
        CutOneWay(usize),
        Heal,
        Wait(u64),
        /// Cut one LAN both ways (the first LAN when only one is configured).
        PartitionLan(usize),
        /// The replication connection breaks at one end while heartbeats flow.
        BreakReplication(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        let command = prop_oneof![
            Just(Command::Start),
            Just(Command::Start),
            Just(Command::Stop),
            Just(Command::ForceStop),
            Just(Command::Prim),
            Just(Command::Second),
            Just(Command::Swap),
            Just(Command::Restart),
        ];
        prop_oneof![
            4 => (0..2usize, command).prop_map(|(node, command)| Step::Command(node, command)),
            1 => (0..2usize).prop_map(Step::Crash),
            1 => (0..2usize).prop_map(Step::RestartAgent),
            1 => Just(Step::Partition),
            1 => (0..2usize).prop_map(Step::CutOneWay),
            1 => Just(Step::Heal),
            3 => (0..12_000u64).prop_map(Step::Wait),
            1 => (0..2usize).prop_map(Step::PartitionLan),
            1 => (0..2usize).prop_map(Step::BreakReplication),
        ]
    }

    fn runs(state: State) -> bool {
        matches!(state, State::Alone | State::Prim)
    }

    proptest! {
        // 256 schedules by default (a few seconds); `PROPTEST_CASES=5000` for a longer hunt.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(256),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn whatever_happens_a_healed_cluster_has_at_most_one_primary(
            steps in proptest::collection::vec(step(), 1..16),
            two_lans in any::<bool>(),
        ) {
            let lans = if two_lans {
                vec![
                    Lan { name: "production".into(), flow: false },
                    Lan { name: "replication".into(), flow: true },
                ]
            } else {
                vec![Lan { name: "default".into(), flow: true }]
            };
            let mut sim = Sim::pair(PairOptions { lans: lans.clone(), ..PairOptions::default() });
            sim.run_for(ms(4000));
            for step in &steps {
                match step {
                    Step::Command(node, command) => {
                        if sim.nodes[*node].alive {
                            sim.command(*node, *command);
                        }
                    }
                    Step::Crash(node) => sim.crash(*node),
                    Step::RestartAgent(node) => {
                        if !sim.nodes[*node].alive {
                            sim.restart_agent(*node);
                        }
                    }
                    Step::Partition => sim.partition(0, 1, None),
                    Step::CutOneWay(from) => sim.cut_one_way(*from, 1 - *from, None),
                    Step::Heal => sim.heal(),
                    Step::Wait(millis) => sim.run_for(ms(*millis)),
                    Step::PartitionLan(index) => {
                        let lan = lans[index % lans.len()].name.clone();
                        sim.partition(0, 1, Some(&lan));
                    }
                    Step::BreakReplication(node) => {
                        if sim.nodes[*node].alive {
                            sim.deliver_event(*node, Event::ReplicationPeerLost);
                        }
                    }
                }
                sim.run_for(ms(10));
            }
            sim.heal();
            for node in 0..2 {
                if !sim.nodes[node].alive {
                    sim.restart_agent(node);
                }
            }
            sim.drive();
            for node in &sim.nodes {
                prop_assert!(node.violations.is_empty(), "{:?}\n{}", node.violations, sim.dump());
            }
            let running = (0..2).filter(|node| runs(sim.state(*node))).count();
            prop_assert!(running <= 1, "two primaries after healing\n{}", sim.dump());
            // A resynchronizing SECOND never became primary on its own.
            for node in &sim.nodes {
                for (_, action) in &node.actions {
                    if let Action::StateChanged { from: State::Second(SecondPhase::Resyncing), to, .. } = action {
                        prop_assert!(!runs(*to), "{} went from resyncing to {to}\n{}", node.name, sim.dump());
                    }
                }
            }
            // Liveness: the operator starts both nodes; the pair forms, or both
            // wait for a decision only an operator can take.
            for node in 0..2 {
                sim.command(node, Command::Start);
            }
            sim.drive();
            let states = (sim.state(0), sim.state(1));
            let formed = matches!(
                states,
                (State::Prim, State::Second(SecondPhase::InSync)) | (State::Second(SecondPhase::InSync), State::Prim)
            );
            let operator_needed = |state: State| matches!(
                state,
                State::Wait(WaitReason::NoUpToDateNode | WaitReason::Inconsistent | WaitReason::ResyncInterrupted)
            );
            prop_assert!(
                formed || (operator_needed(states.0) && operator_needed(states.1)),
                "the pair did not form: {states:?}\n{}",
                sim.dump()
            );
            // A PRIM's SECOND in sync holds the same history.
            for (prim, second) in [(0, 1), (1, 0)] {
                if sim.state(prim) == State::Prim && sim.state(second) == State::Second(SecondPhase::InSync) {
                    let verdict = compare(&sim.nodes[prim].persisted.history, &sim.nodes[second].persisted.history);
                    prop_assert!(matches!(verdict, Verdict::Equal { .. }), "{verdict:?}\n{}", sim.dump());
                }
            }
        }
    }
}

#[test]
fn a_stopped_split_brain_loser_sets_its_files_aside_when_it_starts_again() {
    let mut sim = established_pair();
    sim.partition(NODE1, NODE2, None);
    sim.drive();
    check(&sim, NODE2, State::Alone);
    // node2 (the former SECOND) is powered off while alone, then comes back after the heal.
    sim.crash(NODE2);
    sim.heal();
    sim.drive();
    sim.restart_agent(NODE2);
    sim.command(NODE2, Command::Start);
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    assert!(
        sim.nodes[NODE2].violations.is_empty(),
        "{:?}",
        sim.nodes[NODE2].violations
    );
    check_logged(&sim, NODE2, "SET ASIDE diverged files");
}

#[test]
fn a_swap_interrupted_by_a_replication_failure_is_aborted_and_the_primary_keeps_running() {
    let mut sim = established_pair();
    sim.command(NODE1, Command::Swap);
    // stop_prim is running for the swap when the replication stream breaks.
    sim.deliver_event(NODE1, Event::ReplicationPeerLost);
    sim.run_for(ms(500));
    check(&sim, NODE1, State::Alone);
    check_logged(&sim, NODE1, "Swap aborted");
    assert!(
        sim.nodes[NODE1].application_running && sim.nodes[NODE1].vip,
        "{}",
        sim.dump()
    );
    assert!(!sim.nodes[NODE2].application_running);
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    assert!(
        sim.nodes.iter().all(|node| node.violations.is_empty()),
        "{}",
        sim.dump()
    );
}

// ----- reintegration served by the primary (the Linux data path's handshake) -----

fn served_pair(options: PairOptions) -> Sim {
    let mut sim = Sim::pair(options);
    sim.served_resync = true;
    sim
}

#[test]
fn served_first_start_primary_serves_full_then_both_pair_up() {
    let mut sim = served_pair(PairOptions::default());
    sim.run_for(ms(5000));
    sim.command(NODE1, Command::Prim);
    sim.run_for(ms(1500));
    check(&sim, NODE1, State::Alone);
    sim.command(NODE2, Command::Second);
    sim.run_for(ms(1000));
    check(&sim, NODE2, State::Second(SecondPhase::Resyncing));
    // The ALONE primary serves the peer's attempt: replication on, state still ALONE.
    check(&sim, NODE1, State::Alone);
    check_logged(&sim, NODE1, "served from this node (full)");
    assert_eq!(sim.nodes[NODE1].replication, ReplicationRole::Primary);
    let served = sim.nodes[NODE1]
        .actions
        .iter()
        .filter(|(_, action)| matches!(action, Action::ServeResync { .. }))
        .count();
    assert_eq!(served, 1, "each attempt is served once\n{}", sim.dump());
    // Halfway, the SECOND shows the primary's progress from its heartbeats.
    sim.run_for(ms(1500));
    assert_eq!(
        sim.nodes[NODE2].machine.resync_percent(),
        50,
        "{}",
        sim.dump()
    );
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    check_logged(&sim, NODE1, "served up to generation");
    assert!(sim.nodes[NODE1].machine.serving().is_none());
    assert!(matches!(
        compare(
            &sim.nodes[NODE1].persisted.history,
            &sim.nodes[NODE2].persisted.history
        ),
        Verdict::Equal { .. }
    ));
}

#[test]
fn served_failback_after_a_crash_is_incremental() {
    let mut sim = served_pair(PairOptions::default());
    sim.run_for(ms(5000));
    sim.command(NODE1, Command::Prim);
    sim.run_for(ms(1500));
    sim.command(NODE2, Command::Second);
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    sim.crash(NODE1);
    sim.drive();
    check(&sim, NODE2, State::Alone);
    sim.restart_agent(NODE1);
    sim.command(NODE1, Command::Start);
    sim.drive();
    check(&sim, NODE2, State::Prim);
    check(&sim, NODE1, State::Second(SecondPhase::InSync));
    let incremental = sim.nodes[NODE2].actions.iter().any(|(_, action)| {
        matches!(
            action,
            Action::ServeResync {
                kind: super::ResyncKind::Incremental { .. },
                ..
            }
        )
    });
    assert!(incremental, "{}", sim.dump());
    assert!(sim.nodes.iter().all(|node| node.violations.is_empty()));
}

#[test]
fn served_resync_failing_on_a_replication_cut_is_retried_with_a_new_attempt() {
    let mut sim = served_pair(PairOptions {
        lans: vec![
            Lan {
                name: "default".into(),
                flow: false,
            },
            Lan {
                name: "flow".into(),
                flow: true,
            },
        ],
        ..PairOptions::default()
    });
    sim.run_for(ms(5000));
    sim.command(NODE1, Command::Prim);
    sim.run_for(ms(1500));
    sim.command(NODE2, Command::Second);
    sim.run_for(ms(1500));
    check(&sim, NODE2, State::Second(SecondPhase::Resyncing));
    // Only the replication LAN breaks: heartbeats still flow on the other one.
    sim.partition(NODE1, NODE2, Some("flow"));
    sim.run_for(ms(2000));
    check_logged(&sim, NODE2, "Reintegration failed");
    check(&sim, NODE1, State::Alone);
    sim.heal();
    sim.drive();
    check(&sim, NODE1, State::Prim);
    check(&sim, NODE2, State::Second(SecondPhase::InSync));
    let attempts: std::collections::HashSet<u64> = sim.nodes[NODE1]
        .actions
        .iter()
        .filter_map(|(_, action)| match action {
            Action::ServeResync { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert!(attempts.len() >= 2, "{}", sim.dump());
}
