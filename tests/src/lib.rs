//! The multi-node test harness: nodes as network + mount namespaces on one machine.
