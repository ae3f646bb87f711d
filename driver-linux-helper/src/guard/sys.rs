//! The fanotify calls of the guard: a thin layer over `nix`'s safe fanotify API.
//!
//! Why `nix` and not `fanotify-rs`: `fanotify-rs` 0.3 offers neither
//! `FAN_MARK_FILESYSTEM` with permission classes nor the responses the guard
//! needs, nor the info records of `FAN_REPORT_DFID_NAME` groups. `nix`
//! (feature `fanotify`) wraps `fanotify_init`, `fanotify_mark`, descriptor
//! events and `FAN_ALLOW`/`FAN_DENY` responses safely ([`FanotifyGroup`]).
//! nix does not parse info records, so [`FidGroup`] reads its events with a
//! plain `read` and parses the bytes itself ([`parse_fid_events`], safe
//! code), and [`open_by_handle`] calls `open_by_handle_at(2)` through `libc`.
//! [`make_mount_read_only`] (`mount_setattr(2)`, for the secondary's guard)
//! is here for the same reason: neither `rustix` nor `nix` wraps it. These two
//! are the guard's only `unsafe`, each with its `SAFETY` argument.
//!
//! Waiting: groups are non-blocking and [`wait_readable`] polls them together
//! with a stop descriptor (the read end of a pipe whose write end the owner
//! drops to stop the reader), so the reader thread can be joined.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::fanotify::{EventFFlags, Fanotify, FanotifyResponse, InitFlags, MarkFlags, Response};
pub use nix::sys::fanotify::{FanotifyEvent, MaskFlags};

/// Whether the group only watches or also answers permission events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupClass {
    /// Notification events only (`FAN_CLASS_NOTIF`).
    Notification,
    /// Permission events too (`FAN_CLASS_CONTENT`): every access it watches waits for our answer.
    Permission,
}

/// One fanotify group (a listening descriptor).
#[derive(Debug)]
pub struct FanotifyGroup {
    group: Fanotify,
}

fn io_error(errno: Errno) -> io::Error {
    io::Error::from_raw_os_error(errno as i32)
}

impl FanotifyGroup {
    /// Creates a group whose event descriptors are opened read-only, non-blocking
    /// (a FIFO in the tree never blocks the reader) and close-on-exec.
    ///
    /// # Errors
    /// `fanotify_init` failed (`EPERM` without `CAP_SYS_ADMIN`, `EINVAL` for a
    /// kernel without permission events).
    pub fn new(class: GroupClass) -> io::Result<Self> {
        let class_flag = match class {
            GroupClass::Notification => InitFlags::FAN_CLASS_NOTIF,
            GroupClass::Permission => InitFlags::FAN_CLASS_CONTENT,
        };
        let group = Fanotify::init(
            class_flag | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY
                | EventFFlags::O_LARGEFILE
                | EventFFlags::O_CLOEXEC
                | EventFFlags::O_NONBLOCK
                | EventFFlags::O_NOATIME,
        )
        .map_err(io_error)?;
        Ok(FanotifyGroup { group })
    }

    /// Watches `mask` on the whole file system that `fd` (a normal, not `O_PATH`,
    /// descriptor) is on, through every mount of it.
    ///
    /// # Errors
    /// `fanotify_mark` failed.
    pub fn mark_filesystem(&self, fd: BorrowedFd<'_>, mask: MaskFlags) -> io::Result<()> {
        self.group
            .mark::<_, std::path::Path>(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
                mask,
                fd,
                None,
            )
            .map_err(io_error)
    }

    /// Reads the events that are ready (none when there are none).
    ///
    /// # Errors
    /// The read failed.
    pub fn read(&self) -> io::Result<Vec<FanotifyEvent>> {
        match self.group.read_events() {
            Ok(events) => Ok(events),
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(Vec::new()),
            Err(errno) => Err(io_error(errno)),
        }
    }

    /// Answers a permission event. Events without a descriptor need no answer.
    ///
    /// # Errors
    /// The write to the group failed (the kernel then keeps the access waiting
    /// until the group is closed, which allows it).
    pub fn respond(&self, event: &FanotifyEvent, allow: bool) -> io::Result<()> {
        let Some(fd) = event.fd() else {
            return Ok(());
        };
        let response = if allow {
            Response::FAN_ALLOW
        } else {
            Response::FAN_DENY
        };
        self.group
            .write_response(FanotifyResponse::new(fd, response))
            .map_err(io_error)
    }
}

/// Blocks until one of `fds` is readable (or hung up); returns which ones are.
///
/// # Errors
/// `poll` failed with something else than `EINTR`.
pub fn wait_readable(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<bool>> {
    loop {
        let mut poll_fds: Vec<PollFd<'_>> = fds
            .iter()
            .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
            .collect();
        match nix::poll::poll(&mut poll_fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(io_error(errno)),
        }
        return Ok(poll_fds.iter().map(|fd| fd.any().unwrap_or(true)).collect());
    }
}

impl AsFd for FanotifyGroup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.group.as_fd()
    }
}

/// `sizeof(struct fanotify_event_metadata)`.
const METADATA_LEN: usize = 24;
/// Bytes read from a group at once.
const READ_BUFFER: usize = 64 * 1024;

/// One event of a [`FidGroup`]: the directory (as a file handle) and the name
/// of the entry concerned, instead of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FidEvent {
    /// `FAN_*` bits.
    pub mask: u64,
    /// The process (thread group) that caused it.
    pub pid: i32,
    /// The file system (`f_fsid` as `statvfs` reports it: `val[0] | val[1] << 32`).
    pub fsid: u64,
    /// The directory's file handle type.
    pub handle_type: i32,
    /// The directory's file handle bytes (empty for an overflow event).
    pub handle: Vec<u8>,
    /// The entry's name in that directory; empty or `.` for the directory itself.
    pub name: Vec<u8>,
}

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        bytes.get(offset..offset + 2)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        bytes.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

fn i32_at(bytes: &[u8], offset: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(
        bytes.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        bytes.get(offset..offset + 8)?.try_into().ok()?,
    ))
}

/// Parses what a `read` of a `FAN_REPORT_DFID_NAME` group returned: events
/// (`struct fanotify_event_metadata`) each followed by info records
/// (`struct fanotify_event_info_fid`: header, fsid, `struct file_handle`,
/// then for `*_NAME` records a NUL-terminated name). Unknown records are
/// skipped; a truncated event ends the parse.
pub fn parse_fid_events(bytes: &[u8]) -> Vec<FidEvent> {
    let mut events = Vec::new();
    let mut offset = 0;
    while let Some(event) = bytes.get(offset..) {
        let Some(event_len) = u32_at(event, 0).map(|len| len as usize) else {
            break;
        };
        if event_len < METADATA_LEN || event.len() < event_len {
            break;
        }
        let event = &event[..event_len];
        offset += event_len;
        let (Some(metadata_len), Some(mask), Some(pid)) =
            (u16_at(event, 6), u64_at(event, 8), i32_at(event, 20))
        else {
            continue;
        };
        if event[4] != libc::FANOTIFY_METADATA_VERSION {
            continue;
        }
        let mut parsed = FidEvent {
            mask,
            pid,
            fsid: 0,
            handle_type: 0,
            handle: Vec::new(),
            name: Vec::new(),
        };
        let mut info_offset = usize::from(metadata_len);
        while let Some(info) = event.get(info_offset..) {
            let (Some(&info_type), Some(info_len)) = (info.first(), u16_at(info, 2)) else {
                break;
            };
            let info_len = usize::from(info_len);
            if info_len < 4 || info.len() < info_len {
                break;
            }
            let info = &info[..info_len];
            info_offset += info_len;
            if !matches!(
                info_type,
                libc::FAN_EVENT_INFO_TYPE_FID
                    | libc::FAN_EVENT_INFO_TYPE_DFID
                    | libc::FAN_EVENT_INFO_TYPE_DFID_NAME
            ) {
                continue;
            }
            let (Some(fsid_low), Some(fsid_high), Some(handle_len), Some(handle_type)) = (
                u32_at(info, 4),
                u32_at(info, 8),
                u32_at(info, 12),
                i32_at(info, 16),
            ) else {
                continue;
            };
            let handle_end = 20 + handle_len as usize;
            let Some(handle) = info.get(20..handle_end) else {
                continue;
            };
            parsed.fsid = u64::from(fsid_low) | (u64::from(fsid_high) << 32);
            parsed.handle_type = handle_type;
            parsed.handle = handle.to_vec();
            if info_type == libc::FAN_EVENT_INFO_TYPE_DFID_NAME {
                let name = &info[handle_end..];
                let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
                parsed.name = name[..end].to_vec();
            }
        }
        events.push(parsed);
    }
    events
}

/// A notification group that reports directory file handles and names
/// (`FAN_REPORT_DFID_NAME`): it sees namespace changes (create, delete,
/// rename) as well as writes, and opens no descriptor per event.
#[derive(Debug)]
pub struct FidGroup {
    group: Fanotify,
    buffer: Vec<u8>,
}

impl FidGroup {
    /// Creates the group.
    ///
    /// # Errors
    /// `fanotify_init` failed (`EINVAL` on a kernel without `FAN_REPORT_DFID_NAME`).
    pub fn new() -> io::Result<Self> {
        let group = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF
                | InitFlags::FAN_CLOEXEC
                | InitFlags::FAN_NONBLOCK
                | InitFlags::from_bits_retain(libc::FAN_REPORT_DFID_NAME),
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .map_err(io_error)?;
        Ok(FidGroup {
            group,
            buffer: vec![0; READ_BUFFER],
        })
    }

    /// Watches `mask` on the whole file system `fd` is on.
    ///
    /// # Errors
    /// `fanotify_mark` failed (`EOPNOTSUPP`, `ENODEV` or `EXDEV` for a file
    /// system that cannot encode file handles or has no fsid).
    pub fn mark_filesystem(&self, fd: BorrowedFd<'_>, mask: MaskFlags) -> io::Result<()> {
        self.group
            .mark::<_, std::path::Path>(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
                mask,
                fd,
                None,
            )
            .map_err(io_error)
    }

    /// Reads the events that are ready (none when there are none).
    ///
    /// # Errors
    /// The read failed.
    pub fn read(&mut self) -> io::Result<Vec<FidEvent>> {
        match nix::unistd::read(self.group.as_fd(), &mut self.buffer) {
            Ok(length) => Ok(parse_fid_events(&self.buffer[..length])),
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(Vec::new()),
            Err(errno) => Err(io_error(errno)),
        }
    }
}

impl AsFd for FidGroup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.group.as_fd()
    }
}

/// Opens the object a file handle names, `O_PATH`, through the mount of
/// `mount_fd` (a normal descriptor of any object of the same file system).
///
/// # Errors
/// `open_by_handle_at` failed (`ESTALE`: the object no longer exists).
pub fn open_by_handle(
    mount_fd: BorrowedFd<'_>,
    handle_type: i32,
    handle: &[u8],
) -> io::Result<OwnedFd> {
    let handle_bytes =
        u32::try_from(handle.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // `struct file_handle { unsigned int handle_bytes; int handle_type;
    // unsigned char f_handle[]; }` built in a u32 buffer, which gives it the
    // struct's 4-byte alignment.
    let mut buffer = vec![0u32; 2 + handle.len().div_ceil(4)];
    buffer[0] = handle_bytes;
    buffer[1] = u32::from_ne_bytes(handle_type.to_ne_bytes());
    for (word, chunk) in buffer[2..].iter_mut().zip(handle.chunks(4)) {
        let mut bytes = [0u8; 4];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(bytes);
    }
    // SAFETY: `buffer` is a live, writable, 4-byte aligned allocation of
    // 8 + handle_bytes (rounded up) bytes laid out as `struct file_handle`
    // with `handle_bytes` set to the number of handle bytes that follow, which
    // is all the kernel reads (and it may write back at most `handle_bytes`);
    // `mount_fd` is a valid descriptor for the duration of the call; the
    // flags ask for a new close-on-exec descriptor and nothing else.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            buffer.as_mut_ptr().cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `open_by_handle_at` returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `MOUNT_ATTR_RDONLY` of `mount_setattr(2)`.
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// `struct mount_attr` (`MOUNT_ATTR_SIZE_VER0`, 32 bytes).
#[repr(C)]
#[derive(Debug)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes the mount `mount` (a descriptor from `open_tree`, attached or not)
/// read-only with `mount_setattr(2)`, which `rustix` and `nix` do not wrap.
/// Unlike a `MS_REMOUNT`, it also works on a detached mount.
///
/// # Errors
/// `ENOSYS` before Linux 5.12, or what the kernel refuses.
pub fn make_mount_read_only(mount: BorrowedFd<'_>) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `mount_setattr(dirfd, path, flags, attr, size)` reads a
    // NUL-terminated path (the empty C string literal, static) and `size`
    // bytes at `attr` (a live, properly aligned `struct mount_attr` of exactly
    // that size on our stack); it writes no memory of ours. Every integer
    // argument is passed as a `c_long`, as the variadic `syscall` expects.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::c_long::from(mount.as_raw_fd()),
            c"".as_ptr(),
            libc::c_long::from(libc::AT_EMPTY_PATH),
            std::ptr::from_ref(&attr),
            std::mem::size_of::<MountAttr>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(mask: u64, pid: i32, records: &[Vec<u8>]) -> Vec<u8> {
        let info_len: usize = records.iter().map(Vec::len).sum();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(
            &u32::try_from(METADATA_LEN + info_len)
                .expect("small")
                .to_ne_bytes(),
        );
        bytes.push(libc::FANOTIFY_METADATA_VERSION);
        bytes.push(0);
        bytes.extend_from_slice(&u16::try_from(METADATA_LEN).expect("small").to_ne_bytes());
        bytes.extend_from_slice(&mask.to_ne_bytes());
        bytes.extend_from_slice(&libc::FAN_NOFD.to_ne_bytes());
        bytes.extend_from_slice(&pid.to_ne_bytes());
        for record in records {
            bytes.extend_from_slice(record);
        }
        bytes
    }

    fn dfid_name(fsid: [u32; 2], handle: &[u8], name: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&fsid[0].to_ne_bytes());
        body.extend_from_slice(&fsid[1].to_ne_bytes());
        body.extend_from_slice(&u32::try_from(handle.len()).expect("small").to_ne_bytes());
        body.extend_from_slice(&1i32.to_ne_bytes());
        body.extend_from_slice(handle);
        body.extend_from_slice(name);
        body.push(0);
        while (body.len() + 4) % 4 != 0 {
            body.push(0);
        }
        let mut record = vec![libc::FAN_EVENT_INFO_TYPE_DFID_NAME, 0];
        record.extend_from_slice(&u16::try_from(body.len() + 4).expect("small").to_ne_bytes());
        record.extend_from_slice(&body);
        record
    }

    #[test]
    fn events_with_directory_handles_and_names_are_parsed() {
        let mut bytes = event(
            libc::FAN_MODIFY,
            42,
            &[dfid_name([7, 1], &[1, 2, 3, 4, 5, 6, 7, 8], b"file.txt")],
        );
        bytes.extend(event(libc::FAN_Q_OVERFLOW, -1, &[]));
        bytes.extend(event(
            libc::FAN_CREATE | libc::FAN_ONDIR,
            43,
            &[dfid_name([7, 1], &[9; 12], b"d")],
        ));
        bytes.extend_from_slice(&[1, 2, 3]); // A truncated tail is ignored.
        let events = parse_fid_events(&bytes);
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].mask, libc::FAN_MODIFY);
        assert_eq!(events[0].pid, 42);
        assert_eq!(events[0].fsid, 7 | (1 << 32));
        assert_eq!(events[0].handle, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(events[0].handle_type, 1);
        assert_eq!(events[0].name, b"file.txt");
        assert_eq!(events[1].mask, libc::FAN_Q_OVERFLOW);
        assert!(events[1].handle.is_empty());
        assert_eq!(events[2].name, b"d");
        assert_eq!(events[2].handle, vec![9; 12]);
    }
}
