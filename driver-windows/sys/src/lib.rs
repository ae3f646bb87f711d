//! Kernel glue of the SafeKit minifilter: `DriverEntry`, the Filter Manager
//! registration and callbacks, and the communication port to the agent.
//!
//! Everything that decides (which names are replicated, the message bytes,
//! range and per-file bookkeeping) is in `safekit-driver-windows`, tested on
//! Linux; this crate only moves data between Filter Manager and it. It builds
//! only for `x86_64-pc-windows-msvc` (see `../README.md` for the command) and
//! has never been loaded on Windows: loading, signing and the INF are
//! verified only on a Windows machine.
//!
//! State of the glue (honest list):
//! - Pre-write on a replicated file sends a `PreWrite` message and completes
//!   the write with the agent's status; the agent's reply must come within
//!   [`REPLY_TIMEOUT_100NS`], otherwise the write proceeds unreplicated.
//! - The agent configures the replicated directories by passing a `Configure`
//!   message as its connection context; until then, and after a refused
//!   configuration, nothing is replicated. (That Filter Manager hands the
//!   context over in kernel memory is to be confirmed on Windows; a buffer of
//!   `FilterSendMessage` would be a user address needing SEH, which Rust lacks.)
//! - Create, set-information and cleanup callbacks are registered but pass
//!   through; paging writes (memory-mapped files) are not replicated yet; the
//!   per-file table and dirty ranges are not wired in.
#![cfg_attr(target_os = "windows", no_std)]
#![cfg(target_os = "windows")]

extern crate alloc;

mod ffi;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;
use core::ptr::{self, null_mut};
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use ffi::*;
use safekit_driver_windows::minifilter::{
    self as wire, Body, FileKey, FileRef, Message, PreWrite, Verdict, WriteFlags, WriteOffset,
};
use safekit_driver_windows::paths::{Classification, PathRules};

/// Pool tag `SKmf` (read backwards in pool dumps).
const POOL_TAG: u32 = u32::from_le_bytes(*b"SKmf");
/// Bug check code on a Rust panic (custom, outside Microsoft's range).
const PANIC_BUGCHECK: u32 = 0x5AFE_0001;
/// How long a write waits for the agent: 30 s, relative (negative), in 100 ns.
const REPLY_TIMEOUT_100NS: i64 = -30 * 10_000_000;
/// Largest write sent in one message; larger writes pass unreplicated for now.
const MAX_WRITE_BYTES: usize = 1 << 20;

/// Room for the configured names: small enough to build on DriverEntry's stack.
type Rules = PathRules<1024, 32>;

static FILTER: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static SERVER_PORT: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
static CLIENT_PORT: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
/// The path table; replaced on each agent connection, read under [`RULES_LOCK`].
static RULES: AtomicPtr<Rules> = AtomicPtr::new(null_mut());
/// `EX_PUSH_LOCK` guarding [`RULES`]: shared to classify, exclusive to swap.
static RULES_LOCK: AtomicUsize = AtomicUsize::new(0);
static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// The linker wants this symbol whenever floating point appears anywhere.
#[unsafe(no_mangle)]
#[used]
#[allow(non_upper_case_globals)]
static _fltused: i32 = 0;

/// Rust's heap over the non-paged pool.
struct PoolAllocator;

// SAFETY: ExAllocatePool2 returns memory aligned to 16 bytes on x64 (larger
// alignments are refused with null), valid until ExFreePoolWithTag with the
// same tag, which `dealloc` calls only on pointers `alloc` returned.
unsafe impl GlobalAlloc for PoolAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() > 16 {
            return null_mut();
        }
        // SAFETY: any size is acceptable to ExAllocatePool2 (it returns null on
        // failure); callers run at IRQL <= DISPATCH_LEVEL for non-paged pool.
        unsafe { ExAllocatePool2(POOL_FLAG_NON_PAGED, layout.size(), POOL_TAG) }.cast()
    }

    unsafe fn dealloc(&self, pointer: *mut u8, _layout: Layout) {
        // SAFETY: `pointer` came from `alloc` above, with the same tag.
        unsafe { ExFreePoolWithTag(pointer.cast(), POOL_TAG) }
    }
}

#[global_allocator]
static ALLOCATOR: PoolAllocator = PoolAllocator;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: stopping the machine is the only safe reaction to a broken
    // invariant in a file system filter; the code is a custom one.
    unsafe { KeBugCheckEx(PANIC_BUGCHECK, 0, 0, 0, 0) }
}

static OPERATIONS: [FltOperationRegistration; 5] = [
    FltOperationRegistration {
        major_function: IRP_MJ_CREATE,
        flags: 0,
        pre_operation: None,
        post_operation: Some(post_create),
        reserved1: 0,
    },
    FltOperationRegistration {
        major_function: IRP_MJ_WRITE,
        flags: 0,
        pre_operation: Some(pre_write),
        post_operation: None,
        reserved1: 0,
    },
    FltOperationRegistration {
        major_function: IRP_MJ_SET_INFORMATION,
        flags: 0,
        pre_operation: Some(pre_pass_through),
        post_operation: None,
        reserved1: 0,
    },
    FltOperationRegistration {
        major_function: IRP_MJ_CLEANUP,
        flags: 0,
        pre_operation: Some(pre_pass_through),
        post_operation: None,
        reserved1: 0,
    },
    FltOperationRegistration {
        major_function: IRP_MJ_OPERATION_END,
        flags: 0,
        pre_operation: None,
        post_operation: None,
        reserved1: 0,
    },
];

static REGISTRATION: FltRegistration = FltRegistration {
    size: size_of::<FltRegistration>() as u16,
    version: FLT_REGISTRATION_VERSION_0202,
    flags: 0,
    context_registration: 0,
    operation_registration: OPERATIONS.as_ptr(),
    filter_unload_callback: Some(filter_unload),
    instance_setup_callback: 0,
    instance_query_teardown_callback: 0,
    instance_teardown_start_callback: 0,
    instance_teardown_complete_callback: 0,
    generate_file_name_callback: 0,
    normalize_name_component_callback: 0,
    normalize_context_cleanup_callback: 0,
    transaction_notification_callback: 0,
    normalize_name_component_ex_callback: 0,
};

/// `\SafeKitMinifilterPort`, the port the agent connects to with `FilterConnectCommunicationPort`.
static PORT_NAME: [u16; 22] = utf16_array(b"\\SafeKitMinifilterPort");

const fn utf16_array<const N: usize>(ascii: &[u8; N]) -> [u16; N] {
    let mut out = [0u16; N];
    let mut index = 0;
    while index < N {
        out[index] = ascii[index] as u16;
        index += 1;
    }
    out
}

/// # Safety
///
/// Called once by the I/O manager with a valid driver object.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn DriverEntry(
    driver: Opaque,
    _registry_path: *mut UnicodeString,
) -> NtStatus {
    // SAFETY: the lock word is a static, initialized once before any use.
    unsafe { FltInitializePushLock(RULES_LOCK.as_ptr()) };
    let Some(rules) = new_rules() else {
        return STATUS_INSUFFICIENT_RESOURCES;
    };
    RULES.store(rules, Ordering::Release);

    let mut filter: Opaque = null_mut();
    // SAFETY: `driver` is the driver object we were given; REGISTRATION and
    // OPERATIONS are statics that outlive the filter; `filter` is writable.
    let status = unsafe { FltRegisterFilter(driver, &REGISTRATION, &mut filter) };
    if !nt_success(status) {
        free_rules();
        return status;
    }
    FILTER.store(filter, Ordering::Release);

    let status = create_port(filter);
    if !nt_success(status) {
        // SAFETY: `filter` was registered above and has no port or instances yet.
        unsafe { FltUnregisterFilter(filter) };
        free_rules();
        return status;
    }
    // SAFETY: `filter` is registered and its port exists.
    let status = unsafe { FltStartFiltering(filter) };
    if !nt_success(status) {
        close_server_port();
        // SAFETY: as above; filtering never started.
        unsafe { FltUnregisterFilter(filter) };
        free_rules();
    }
    status
}

fn create_port(filter: Opaque) -> NtStatus {
    let mut security_descriptor: *mut c_void = null_mut();
    // SAFETY: the out pointer is valid; freed below in every case.
    let status =
        unsafe { FltBuildDefaultSecurityDescriptor(&mut security_descriptor, FLT_PORT_ALL_ACCESS) };
    if !nt_success(status) {
        return status;
    }
    let mut name = UnicodeString {
        length: (PORT_NAME.len() * 2) as u16,
        maximum_length: (PORT_NAME.len() * 2) as u16,
        buffer: PORT_NAME.as_ptr().cast_mut(),
    };
    let mut attributes = ObjectAttributes {
        length: size_of::<ObjectAttributes>() as u32,
        root_directory: null_mut(),
        object_name: &mut name,
        attributes: OBJ_CASE_INSENSITIVE | OBJ_KERNEL_HANDLE,
        security_descriptor,
        security_quality_of_service: null_mut(),
    };
    let mut server_port: Opaque = null_mut();
    // SAFETY: every pointer refers to a live local or static; the name buffer
    // is only read; the callbacks have the prototypes fltKernel.h declares.
    let status = unsafe {
        FltCreateCommunicationPort(
            filter,
            &mut server_port,
            &mut attributes,
            null_mut(),
            Some(port_connect),
            Some(port_disconnect),
            Some(port_message),
            1,
        )
    };
    // SAFETY: built by FltBuildDefaultSecurityDescriptor; the port keeps its own copy.
    unsafe { FltFreeSecurityDescriptor(security_descriptor) };
    if nt_success(status) {
        SERVER_PORT.store(server_port, Ordering::Release);
    }
    status
}

fn close_server_port() {
    let port = SERVER_PORT.swap(null_mut(), Ordering::AcqRel);
    if !port.is_null() {
        // SAFETY: `port` came from FltCreateCommunicationPort and is closed once.
        unsafe { FltCloseCommunicationPort(port) };
    }
}

/// An empty path table in pool memory. Allocated by hand so that running
/// out of pool is an error instead of the bug check `Box::new` would cause.
fn new_rules() -> Option<*mut Rules> {
    let layout = Layout::new::<Rules>();
    // SAFETY: `Rules` is not zero-sized.
    let rules = unsafe { alloc::alloc::alloc(layout) }.cast::<Rules>();
    if rules.is_null() {
        return None;
    }
    // SAFETY: `rules` is valid for writes and aligned for a `Rules`; it is
    // later freed as a `Box<Rules>`, which has the same layout.
    unsafe { rules.write(Rules::new()) };
    Some(rules)
}

/// Frees a table from [`new_rules`] that no reader can see any more.
fn drop_rules(rules: *mut Rules) {
    if !rules.is_null() {
        // SAFETY: `rules` came from `new_rules` and is unreachable.
        drop(unsafe { Box::from_raw(rules) });
    }
}

/// At unload or a failed load, when no callback runs any more.
fn free_rules() {
    drop_rules(RULES.swap(null_mut(), Ordering::AcqRel));
    // SAFETY: initialized in DriverEntry; no thread holds or waits on it.
    unsafe { FltDeletePushLock(RULES_LOCK.as_ptr()) };
}

/// Replaces the path table, waiting for readers of the old one.
fn install_rules(rules: *mut Rules) {
    // SAFETY: the lock was initialized in DriverEntry; this runs at
    // PASSIVE_LEVEL in the connect callback.
    unsafe { FltAcquirePushLockExclusive(RULES_LOCK.as_ptr()) };
    let old = RULES.swap(rules, Ordering::AcqRel);
    // SAFETY: acquired just above.
    unsafe { FltReleasePushLock(RULES_LOCK.as_ptr()) };
    drop_rules(old);
}

/// Builds a path table from the agent's connection context.
fn rules_from_context(context: &[u8]) -> Result<*mut Rules, NtStatus> {
    let Ok(Message {
        body: Body::Configure(configure),
        ..
    }) = Message::decode(context)
    else {
        return Err(STATUS_INVALID_PARAMETER);
    };
    let rules = new_rules().ok_or(STATUS_INSUFFICIENT_RESOURCES)?;
    // SAFETY: `rules` is a fresh table nobody else can see.
    match unsafe { (*rules).apply(&configure) } {
        Ok(()) => Ok(rules),
        Err(_) => {
            drop_rules(rules);
            Err(STATUS_INVALID_PARAMETER)
        }
    }
}

unsafe extern "system" fn filter_unload(_flags: u32) -> NtStatus {
    close_server_port();
    let filter = FILTER.swap(null_mut(), Ordering::AcqRel);
    if !filter.is_null() {
        // SAFETY: registered in DriverEntry; this waits for callbacks to drain.
        unsafe { FltUnregisterFilter(filter) };
    }
    free_rules();
    STATUS_SUCCESS
}

unsafe extern "system" fn port_connect(
    client_port: Opaque,
    _server_port_cookie: *mut c_void,
    connection_context: *mut c_void,
    size_of_context: u32,
    connection_cookie: *mut *mut c_void,
) -> NtStatus {
    let context: &[u8] = if connection_context.is_null() {
        &[]
    } else {
        // SAFETY: Filter Manager passes `size_of_context` readable bytes.
        unsafe {
            core::slice::from_raw_parts(connection_context.cast::<u8>(), size_of_context as usize)
        }
    };
    match rules_from_context(context) {
        Ok(rules) => install_rules(rules),
        Err(status) => return status,
    }
    CLIENT_PORT.store(client_port, Ordering::Release);
    if !connection_cookie.is_null() {
        // SAFETY: Filter Manager passes a writable cookie slot.
        unsafe { connection_cookie.write(null_mut()) };
    }
    STATUS_SUCCESS
}

unsafe extern "system" fn port_disconnect(_connection_cookie: *mut c_void) {
    // SAFETY: FltCloseClientPort takes the address of the variable holding
    // the port and clears it, synchronizing with FltSendMessage callers that
    // pass the same address; AtomicPtr has the layout of a pointer.
    unsafe { FltCloseClientPort(FILTER.load(Ordering::Acquire), CLIENT_PORT.as_ptr()) };
}

/// Agent-to-driver messages other than replies: none are defined yet.
unsafe extern "system" fn port_message(
    _port_cookie: *mut c_void,
    _input: *mut c_void,
    _input_length: u32,
    _output: *mut c_void,
    _output_length: u32,
    returned_length: *mut u32,
) -> NtStatus {
    if !returned_length.is_null() {
        // SAFETY: Filter Manager passes a writable length.
        unsafe { returned_length.write(0) };
    }
    STATUS_INVALID_PARAMETER
}

unsafe extern "system" fn post_create(
    _data: *mut FltCallbackData,
    _objects: *const FltRelatedObjects,
    _context: *mut c_void,
    _flags: u32,
) -> FltPostopCallbackStatus {
    FLT_POSTOP_FINISHED_PROCESSING
}

unsafe extern "system" fn pre_pass_through(
    _data: *mut FltCallbackData,
    _objects: *const FltRelatedObjects,
    _context: *mut *mut c_void,
) -> FltPreopCallbackStatus {
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

unsafe extern "system" fn pre_write(
    data: *mut FltCallbackData,
    objects: *const FltRelatedObjects,
    _context: *mut *mut c_void,
) -> FltPreopCallbackStatus {
    // SAFETY: Filter Manager passes valid callback data and related objects
    // for the duration of the callback.
    let data = unsafe { &mut *data };
    // SAFETY: as above.
    let objects = unsafe { &*objects };
    if data.flags & FLTFL_CALLBACK_DATA_FAST_IO_OPERATION != 0 {
        // Come back as an IRP, where the write can wait for the agent.
        return FLT_PREOP_DISALLOW_FASTIO;
    }
    if CLIENT_PORT.load(Ordering::Acquire).is_null() {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    // SAFETY: `iopb` is valid for the callback.
    let iopb = unsafe { &*data.iopb };
    if iopb.irp_flags & IRP_PAGING_IO != 0 {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    let Some(dir_index) = replicated_dir(data) else {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    };
    // SAFETY: this is an IRP_MJ_WRITE, so `Write` is the active member.
    let write = unsafe { iopb.parameters.write };
    let length = write.length as usize;
    if length > MAX_WRITE_BYTES {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    let Some(bytes) = write_bytes(data, length) else {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    };
    let key = FileKey {
        volume_serial: 0,
        file_id: file_id(objects).unwrap_or(0),
    };
    // `FILE_WRITE_TO_END_OF_FILE` with `HighPart == -1`.
    let offset = if write.byte_offset == 0xFFFF_FFFF_FFFF_FFFF_u64 as i64 {
        WriteOffset::EndOfFile
    } else {
        WriteOffset::At(write.byte_offset as u64)
    };
    let message = Message {
        request_id: NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed),
        body: Body::PreWrite(PreWrite {
            file: FileRef {
                key,
                dir_index: dir_index.0,
                process_id: 0,
            },
            offset,
            flags: WriteFlags {
                paging_io: false,
                write_through: false,
            },
            data: bytes,
        }),
    };
    match ask_agent(&message) {
        Some(Verdict::Fail(status)) => {
            data.io_status.value.status = status.code() as i32;
            data.io_status.information = 0;
            FLT_PREOP_COMPLETE
        }
        // Allowed, or the agent did not answer in time: the write proceeds.
        Some(Verdict::Allow) | None => FLT_PREOP_SUCCESS_NO_CALLBACK,
    }
}

/// The replicated directory of the file `data` targets, if any.
fn replicated_dir(data: &mut FltCallbackData) -> Option<safekit_driver_windows::paths::DirIndex> {
    let mut info: *mut FltFileNameInformation = null_mut();
    // SAFETY: `data` is the current callback data; `info` receives a
    // reference released below.
    let status = unsafe {
        FltGetFileNameInformation(
            data,
            FLT_FILE_NAME_NORMALIZED | FLT_FILE_NAME_QUERY_DEFAULT,
            &mut info,
        )
    };
    if !nt_success(status) || info.is_null() {
        return None;
    }
    // SAFETY: on success `info` points at a name structure whose buffer holds
    // `length` bytes, valid until it is released.
    let name = unsafe { &(*info).name };
    let units = if name.buffer.is_null() {
        &[][..]
    } else {
        // SAFETY: as above; the length is in bytes.
        unsafe { core::slice::from_raw_parts(name.buffer, usize::from(name.length) / 2) }
    };
    // SAFETY: the lock was initialized in DriverEntry; callbacks run at
    // IRQL <= APC_LEVEL.
    unsafe { FltAcquirePushLockShared(RULES_LOCK.as_ptr()) };
    let rules_pointer = RULES.load(Ordering::Acquire);
    let classification = if rules_pointer.is_null() {
        Ok(Classification::Outside)
    } else {
        // SAFETY: a table is freed only after being swapped out under the
        // exclusive lock, which waits for this shared holder.
        unsafe { &*rules_pointer }.classify(units)
    };
    // SAFETY: acquired just above.
    unsafe { FltReleasePushLock(RULES_LOCK.as_ptr()) };
    // SAFETY: `info` came from FltGetFileNameInformation and is released once.
    unsafe { FltReleaseFileNameInformation(info) };
    match classification {
        Ok(Classification::Replicated(dir)) => Some(dir),
        _ => None,
    }
}

/// The bytes being written, through a system-space mapping of a locked MDL
/// (never the raw user pointer, which could fault without SEH to catch it).
/// The lifetime is unbounded: the caller must drop the slice before the
/// callback returns.
fn write_bytes<'io>(data: &mut FltCallbackData, length: usize) -> Option<&'io [u8]> {
    if length == 0 {
        return Some(&[]);
    }
    // SAFETY: `data` is the current IRP_MJ_WRITE callback data.
    let status = unsafe { FltLockUserBuffer(data) };
    if !nt_success(status) {
        return None;
    }
    // SAFETY: `iopb` is valid; `Write` is the active member; FltLockUserBuffer
    // set `MdlAddress` on success.
    let mdl = unsafe { (*data.iopb).parameters.write.mdl_address };
    if mdl.is_null() {
        return None;
    }
    // SAFETY: `mdl` describes locked pages for the duration of the I/O.
    let flags = unsafe { (*mdl).mdl_flags };
    let address = if flags & (MDL_MAPPED_TO_SYSTEM_VA | MDL_SOURCE_IS_NONPAGED_POOL) != 0 {
        // SAFETY: as above.
        unsafe { (*mdl).mapped_system_va }
    } else {
        // SAFETY: `mdl` is locked; this is MmGetSystemAddressForMdlSafe.
        unsafe {
            MmMapLockedPagesSpecifyCache(
                mdl,
                KERNEL_MODE,
                MM_CACHED,
                null_mut(),
                0,
                NORMAL_PAGE_PRIORITY_NO_EXECUTE,
            )
        }
    };
    if address.is_null() {
        return None;
    }
    // SAFETY: the mapping covers the `length` bytes of the write and stays
    // valid until the IRP completes, after this callback returns.
    Some(unsafe { core::slice::from_raw_parts(address.cast::<u8>(), length) })
}

/// NTFS's 64-bit file reference number (`FileInternalInformation`).
fn file_id(objects: &FltRelatedObjects) -> Option<u128> {
    let mut index_number: i64 = 0;
    let mut returned: u32 = 0;
    // SAFETY: instance and file object come from Filter Manager for this
    // callback; the buffer is a live local of the documented size.
    let status = unsafe {
        FltQueryInformationFile(
            objects.instance,
            objects.file_object,
            ptr::addr_of_mut!(index_number).cast(),
            size_of::<i64>() as u32,
            FILE_INTERNAL_INFORMATION,
            &mut returned,
        )
    };
    nt_success(status).then_some(index_number as u64 as u128)
}

/// Sends `message` and waits for the agent's verdict; `None` on any failure
/// or timeout.
fn ask_agent(message: &Message<'_>) -> Option<Verdict> {
    let length = message.encoded_len().ok()?;
    let mut buffer: Vec<u8> = Vec::new();
    buffer.try_reserve_exact(length).ok()?;
    buffer.resize(length, 0);
    let written = message.encode(&mut buffer).ok()?;
    let mut reply = [0u8; wire::HEADER_LEN + wire::REPLY_LEN];
    let mut reply_length = reply.len() as u32;
    let mut timeout = REPLY_TIMEOUT_100NS;
    // SAFETY: buffers are live locals of the stated sizes; CLIENT_PORT's
    // address is what FltCloseClientPort clears, as Filter Manager requires.
    let status = unsafe {
        FltSendMessage(
            FILTER.load(Ordering::Acquire),
            CLIENT_PORT.as_ptr(),
            buffer.as_mut_ptr().cast(),
            written as u32,
            reply.as_mut_ptr().cast(),
            &mut reply_length,
            &mut timeout,
        )
    };
    // STATUS_TIMEOUT is a success code: the agent did not answer in time.
    if status == STATUS_TIMEOUT || !nt_success(status) {
        return None;
    }
    let reply = reply.get(..reply_length as usize)?;
    match Message::decode(reply) {
        Ok(Message {
            request_id,
            body: Body::Reply(answer),
        }) if request_id == message.request_id => Some(answer.verdict),
        _ => None,
    }
}
