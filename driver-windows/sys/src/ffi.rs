//! Hand-written declarations of the kernel and Filter Manager interfaces the
//! minifilter uses, because no published crate exposes `fltKernel.h` and
//! `wdk-sys` cannot be built off Windows (`shared/reference/windows-build.md`).
//!
//! Every structure has compile-time size and offset assertions for
//! x86_64. Where the values come from:
//! - `FLT_*` structures and prototypes: ReactOS `sdk/include/ddk/fltkernel.h`
//!   (public domain re-implementation of the WDK header), with the x64 rule
//!   that `POINTER_ALIGNMENT` aligns a field to 8 bytes; prototypes also match
//!   Microsoft's documentation pages for each `Flt*` routine.
//! - `UNICODE_STRING`, `OBJECT_ATTRIBUTES`, `IO_STATUS_BLOCK`, `MDL`: `wdm.h`
//!   (also in MinGW's `ddk/wdm.h`); these are stable since NT 4.
//! - Constants: `fltKernel.h`, `wdm.h`, `ntstatus.h` as documented by Microsoft.
//!
//! Only x86_64 is declared; other targets fail the assertions.

use core::ffi::c_void;
use core::mem::{offset_of, size_of};

pub type NtStatus = i32;
pub type Handle = *mut c_void;
/// `PFLT_FILTER`, `PFLT_PORT`, `PFLT_INSTANCE`, `PFILE_OBJECT`...: opaque.
pub type Opaque = *mut c_void;

pub const STATUS_SUCCESS: NtStatus = 0;
/// `STATUS_TIMEOUT` is a success code (0x102): `NT_SUCCESS` is true for it.
pub const STATUS_TIMEOUT: NtStatus = 0x102;
pub const STATUS_INVALID_PARAMETER: NtStatus = 0xC000_000D_u32 as i32;
pub const STATUS_INSUFFICIENT_RESOURCES: NtStatus = 0xC000_009A_u32 as i32;

pub fn nt_success(status: NtStatus) -> bool {
    status >= 0
}

/// `UNICODE_STRING`: lengths in bytes.
#[repr(C)]
#[derive(Debug)]
pub struct UnicodeString {
    pub length: u16,
    pub maximum_length: u16,
    pub buffer: *mut u16,
}
const _: () = assert!(size_of::<UnicodeString>() == 16);
const _: () = assert!(offset_of!(UnicodeString, buffer) == 8);

/// `OBJECT_ATTRIBUTES`.
#[repr(C)]
#[derive(Debug)]
pub struct ObjectAttributes {
    pub length: u32,
    pub root_directory: Handle,
    pub object_name: *mut UnicodeString,
    pub attributes: u32,
    pub security_descriptor: *mut c_void,
    pub security_quality_of_service: *mut c_void,
}
const _: () = assert!(size_of::<ObjectAttributes>() == 48);
const _: () = assert!(offset_of!(ObjectAttributes, root_directory) == 8);
const _: () = assert!(offset_of!(ObjectAttributes, object_name) == 16);
const _: () = assert!(offset_of!(ObjectAttributes, attributes) == 24);
const _: () = assert!(offset_of!(ObjectAttributes, security_descriptor) == 32);
const _: () = assert!(offset_of!(ObjectAttributes, security_quality_of_service) == 40);

pub const OBJ_CASE_INSENSITIVE: u32 = 0x40;
pub const OBJ_KERNEL_HANDLE: u32 = 0x200;

/// The `Status`/`Pointer` union of `IO_STATUS_BLOCK`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IoStatusValue {
    pub status: NtStatus,
    pub pointer: *mut c_void,
}

/// `IO_STATUS_BLOCK`.
#[repr(C)]
pub struct IoStatusBlock {
    pub value: IoStatusValue,
    pub information: usize,
}
const _: () = assert!(size_of::<IoStatusBlock>() == 16);
const _: () = assert!(offset_of!(IoStatusBlock, information) == 8);

/// `MDL` (only the header; the page array follows it).
#[repr(C)]
#[derive(Debug)]
pub struct Mdl {
    pub next: *mut Mdl,
    pub size: i16,
    pub mdl_flags: i16,
    pub process: Opaque,
    pub mapped_system_va: *mut c_void,
    pub start_va: *mut c_void,
    pub byte_count: u32,
    pub byte_offset: u32,
}
const _: () = assert!(size_of::<Mdl>() == 48);
const _: () = assert!(offset_of!(Mdl, mdl_flags) == 10);
const _: () = assert!(offset_of!(Mdl, mapped_system_va) == 24);
const _: () = assert!(offset_of!(Mdl, byte_count) == 40);

pub const MDL_MAPPED_TO_SYSTEM_VA: i16 = 0x0001;
pub const MDL_SOURCE_IS_NONPAGED_POOL: i16 = 0x0004;
/// `KernelMode`.
pub const KERNEL_MODE: i8 = 0;
/// `MmCached`.
pub const MM_CACHED: i32 = 1;
/// `NormalPagePriority | MdlMappingNoExecute`.
pub const NORMAL_PAGE_PRIORITY_NO_EXECUTE: u32 = 16 | 0x4000_0000;

/// `FLT_PARAMETERS.Write`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WriteParameters {
    pub length: u32,
    _pad0: u32,
    /// `POINTER_ALIGNMENT`.
    pub key: u32,
    pub byte_offset: i64,
    pub write_buffer: *mut c_void,
    pub mdl_address: *mut Mdl,
}
const _: () = assert!(size_of::<WriteParameters>() == 40);
const _: () = assert!(offset_of!(WriteParameters, key) == 8);
const _: () = assert!(offset_of!(WriteParameters, byte_offset) == 16);
const _: () = assert!(offset_of!(WriteParameters, write_buffer) == 24);
const _: () = assert!(offset_of!(WriteParameters, mdl_address) == 32);

/// `FLT_PARAMETERS.SetFileInformation`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SetFileInformationParameters {
    pub length: u32,
    _pad0: u32,
    /// `FILE_INFORMATION_CLASS`, `POINTER_ALIGNMENT`.
    pub file_information_class: u32,
    pub parent_of_target: Opaque,
    /// `ReplaceIfExists`/`AdvanceOnly` bytes, `ClusterCount` or `DeleteHandle`.
    pub replace_or_delete_handle: usize,
    pub info_buffer: *mut c_void,
}
const _: () = assert!(size_of::<SetFileInformationParameters>() == 40);
const _: () = assert!(offset_of!(SetFileInformationParameters, file_information_class) == 8);
const _: () = assert!(offset_of!(SetFileInformationParameters, parent_of_target) == 16);
const _: () = assert!(offset_of!(SetFileInformationParameters, info_buffer) == 32);

/// `FLT_PARAMETERS.Create`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CreateParameters {
    pub security_context: *mut c_void,
    /// Disposition in the high 8 bits, options in the low 24.
    pub options: u32,
    _pad0: u32,
    /// `POINTER_ALIGNMENT`.
    pub file_attributes: u16,
    pub share_access: u16,
    _pad1: u32,
    /// `POINTER_ALIGNMENT`.
    pub ea_length: u32,
    pub ea_buffer: *mut c_void,
    pub allocation_size: i64,
}
const _: () = assert!(size_of::<CreateParameters>() == 48);
const _: () = assert!(offset_of!(CreateParameters, options) == 8);
const _: () = assert!(offset_of!(CreateParameters, file_attributes) == 16);
const _: () = assert!(offset_of!(CreateParameters, share_access) == 18);
const _: () = assert!(offset_of!(CreateParameters, ea_length) == 24);
const _: () = assert!(offset_of!(CreateParameters, ea_buffer) == 32);
const _: () = assert!(offset_of!(CreateParameters, allocation_size) == 40);

/// `FLT_PARAMETERS`: its largest members (`Create`, `Others`) are 48 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub union FltParameters {
    pub write: WriteParameters,
    pub set_file_information: SetFileInformationParameters,
    pub create: CreateParameters,
    /// `Others`: five pointers and a `LARGE_INTEGER`.
    pub others: [u64; 6],
}
const _: () = assert!(size_of::<FltParameters>() == 48);

/// `FLT_IO_PARAMETER_BLOCK`.
#[repr(C)]
pub struct FltIoParameterBlock {
    pub irp_flags: u32,
    pub major_function: u8,
    pub minor_function: u8,
    pub operation_flags: u8,
    pub reserved: u8,
    pub target_file_object: Opaque,
    pub target_instance: Opaque,
    pub parameters: FltParameters,
}
const _: () = assert!(size_of::<FltIoParameterBlock>() == 72);
const _: () = assert!(offset_of!(FltIoParameterBlock, major_function) == 4);
const _: () = assert!(offset_of!(FltIoParameterBlock, target_file_object) == 8);
const _: () = assert!(offset_of!(FltIoParameterBlock, target_instance) == 16);
const _: () = assert!(offset_of!(FltIoParameterBlock, parameters) == 24);

/// `FLT_CALLBACK_DATA`.
#[repr(C)]
pub struct FltCallbackData {
    pub flags: u32,
    pub thread: Opaque,
    pub iopb: *mut FltIoParameterBlock,
    pub io_status: IoStatusBlock,
    pub tag_data: *mut c_void,
    /// `QueueLinks` + `QueueContext[2]`, or `FilterContext[4]`.
    pub filter_context: [*mut c_void; 4],
    pub requestor_mode: i8,
}
const _: () = assert!(size_of::<FltCallbackData>() == 88);
const _: () = assert!(offset_of!(FltCallbackData, thread) == 8);
const _: () = assert!(offset_of!(FltCallbackData, iopb) == 16);
const _: () = assert!(offset_of!(FltCallbackData, io_status) == 24);
const _: () = assert!(offset_of!(FltCallbackData, tag_data) == 40);
const _: () = assert!(offset_of!(FltCallbackData, filter_context) == 48);
const _: () = assert!(offset_of!(FltCallbackData, requestor_mode) == 80);

pub const FLTFL_CALLBACK_DATA_FAST_IO_OPERATION: u32 = 0x0000_0002;
/// `IRP_PAGING_IO` in `FLT_IO_PARAMETER_BLOCK.IrpFlags`.
pub const IRP_PAGING_IO: u32 = 0x0000_0002;

/// `FLT_RELATED_OBJECTS`.
#[repr(C)]
#[derive(Debug)]
pub struct FltRelatedObjects {
    pub size: u16,
    pub transaction_context: u16,
    pub filter: Opaque,
    pub volume: Opaque,
    pub instance: Opaque,
    pub file_object: Opaque,
    pub transaction: Opaque,
}
const _: () = assert!(size_of::<FltRelatedObjects>() == 48);
const _: () = assert!(offset_of!(FltRelatedObjects, filter) == 8);
const _: () = assert!(offset_of!(FltRelatedObjects, instance) == 24);
const _: () = assert!(offset_of!(FltRelatedObjects, file_object) == 32);

/// `FLT_PREOP_CALLBACK_STATUS`.
pub type FltPreopCallbackStatus = i32;
pub const FLT_PREOP_SUCCESS_NO_CALLBACK: FltPreopCallbackStatus = 1;
pub const FLT_PREOP_DISALLOW_FASTIO: FltPreopCallbackStatus = 3;
pub const FLT_PREOP_COMPLETE: FltPreopCallbackStatus = 4;
/// `FLT_POSTOP_CALLBACK_STATUS`.
pub type FltPostopCallbackStatus = i32;
pub const FLT_POSTOP_FINISHED_PROCESSING: FltPostopCallbackStatus = 0;

pub type PreOperationCallback = unsafe extern "system" fn(
    data: *mut FltCallbackData,
    objects: *const FltRelatedObjects,
    completion_context: *mut *mut c_void,
) -> FltPreopCallbackStatus;
pub type PostOperationCallback = unsafe extern "system" fn(
    data: *mut FltCallbackData,
    objects: *const FltRelatedObjects,
    completion_context: *mut c_void,
    flags: u32,
) -> FltPostopCallbackStatus;
pub type FilterUnloadCallback = unsafe extern "system" fn(flags: u32) -> NtStatus;
pub type ConnectNotify = unsafe extern "system" fn(
    client_port: Opaque,
    server_port_cookie: *mut c_void,
    connection_context: *mut c_void,
    size_of_context: u32,
    connection_port_cookie: *mut *mut c_void,
) -> NtStatus;
pub type DisconnectNotify = unsafe extern "system" fn(connection_cookie: *mut c_void);
pub type MessageNotify = unsafe extern "system" fn(
    port_cookie: *mut c_void,
    input_buffer: *mut c_void,
    input_buffer_length: u32,
    output_buffer: *mut c_void,
    output_buffer_length: u32,
    return_output_buffer_length: *mut u32,
) -> NtStatus;

/// `FLT_OPERATION_REGISTRATION`.
#[repr(C)]
#[derive(Debug)]
pub struct FltOperationRegistration {
    pub major_function: u8,
    pub flags: u32,
    pub pre_operation: Option<PreOperationCallback>,
    pub post_operation: Option<PostOperationCallback>,
    pub reserved1: usize,
}
const _: () = assert!(size_of::<FltOperationRegistration>() == 32);
const _: () = assert!(offset_of!(FltOperationRegistration, flags) == 4);
const _: () = assert!(offset_of!(FltOperationRegistration, pre_operation) == 8);
const _: () = assert!(offset_of!(FltOperationRegistration, post_operation) == 16);

pub const IRP_MJ_CREATE: u8 = 0x00;
pub const IRP_MJ_WRITE: u8 = 0x04;
pub const IRP_MJ_SET_INFORMATION: u8 = 0x06;
pub const IRP_MJ_CLEANUP: u8 = 0x12;
pub const IRP_MJ_OPERATION_END: u8 = 0x80;

/// `FLT_REGISTRATION`, version `FLT_REGISTRATION_VERSION_0202` (Vista and
/// later; without the Windows 8 `SectionNotificationCallback`).
#[repr(C)]
#[derive(Debug)]
pub struct FltRegistration {
    pub size: u16,
    pub version: u16,
    pub flags: u32,
    pub context_registration: usize,
    pub operation_registration: *const FltOperationRegistration,
    pub filter_unload_callback: Option<FilterUnloadCallback>,
    pub instance_setup_callback: usize,
    pub instance_query_teardown_callback: usize,
    pub instance_teardown_start_callback: usize,
    pub instance_teardown_complete_callback: usize,
    pub generate_file_name_callback: usize,
    pub normalize_name_component_callback: usize,
    pub normalize_context_cleanup_callback: usize,
    pub transaction_notification_callback: usize,
    pub normalize_name_component_ex_callback: usize,
}
const _: () = assert!(size_of::<FltRegistration>() == 104);
const _: () = assert!(offset_of!(FltRegistration, flags) == 4);
const _: () = assert!(offset_of!(FltRegistration, context_registration) == 8);
const _: () = assert!(offset_of!(FltRegistration, operation_registration) == 16);
const _: () = assert!(offset_of!(FltRegistration, filter_unload_callback) == 24);
const _: () = assert!(offset_of!(FltRegistration, instance_setup_callback) == 32);
const _: () = assert!(offset_of!(FltRegistration, normalize_name_component_ex_callback) == 96);

// SAFETY: the registration is immutable after construction, and Filter
// Manager only reads it (it copies what it needs in FltRegisterFilter); the
// one raw pointer points at an immutable static array.
unsafe impl Sync for FltRegistration {}

pub const FLT_REGISTRATION_VERSION_0202: u16 = 0x0202;

/// `FLT_FILE_NAME_INFORMATION`.
#[repr(C)]
#[derive(Debug)]
pub struct FltFileNameInformation {
    pub size: u16,
    pub names_parsed: u16,
    pub format: u32,
    pub name: UnicodeString,
    pub volume: UnicodeString,
    pub share: UnicodeString,
    pub extension: UnicodeString,
    pub stream: UnicodeString,
    pub final_component: UnicodeString,
    pub parent_dir: UnicodeString,
}
const _: () = assert!(size_of::<FltFileNameInformation>() == 120);
const _: () = assert!(offset_of!(FltFileNameInformation, name) == 8);
const _: () = assert!(offset_of!(FltFileNameInformation, parent_dir) == 104);

pub const FLT_FILE_NAME_NORMALIZED: u32 = 0x01;
pub const FLT_FILE_NAME_QUERY_DEFAULT: u32 = 0x0100;
/// `FLT_PORT_CONNECT | STANDARD_RIGHTS_ALL`.
pub const FLT_PORT_ALL_ACCESS: u32 = 0x0001 | 0x001F_0000;
/// `FileInternalInformation` (`FILE_INTERNAL_INFORMATION`: one `LARGE_INTEGER`).
pub const FILE_INTERNAL_INFORMATION: u32 = 6;

/// `POOL_FLAG_NON_PAGED`.
pub const POOL_FLAG_NON_PAGED: u64 = 0x0000_0000_0000_0040;

#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    pub fn ExAllocatePool2(flags: u64, number_of_bytes: usize, tag: u32) -> *mut c_void;
    pub fn ExFreePoolWithTag(pointer: *mut c_void, tag: u32);
    pub fn KeBugCheckEx(code: u32, p1: usize, p2: usize, p3: usize, p4: usize) -> !;
    pub fn MmMapLockedPagesSpecifyCache(
        mdl: *mut Mdl,
        access_mode: i8,
        cache_type: i32,
        requested_address: *mut c_void,
        bug_check_on_failure: u32,
        priority: u32,
    ) -> *mut c_void;
}

#[link(name = "fltmgr.sys", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    pub fn FltRegisterFilter(
        driver: Opaque,
        registration: *const FltRegistration,
        ret_filter: *mut Opaque,
    ) -> NtStatus;
    pub fn FltUnregisterFilter(filter: Opaque);
    pub fn FltStartFiltering(filter: Opaque) -> NtStatus;
    pub fn FltBuildDefaultSecurityDescriptor(
        security_descriptor: *mut *mut c_void,
        desired_access: u32,
    ) -> NtStatus;
    pub fn FltFreeSecurityDescriptor(security_descriptor: *mut c_void);
    pub fn FltCreateCommunicationPort(
        filter: Opaque,
        server_port: *mut Opaque,
        object_attributes: *mut ObjectAttributes,
        server_port_cookie: *mut c_void,
        connect_notify: Option<ConnectNotify>,
        disconnect_notify: Option<DisconnectNotify>,
        message_notify: Option<MessageNotify>,
        max_connections: i32,
    ) -> NtStatus;
    pub fn FltCloseCommunicationPort(server_port: Opaque);
    pub fn FltCloseClientPort(filter: Opaque, client_port: *mut Opaque);
    pub fn FltSendMessage(
        filter: Opaque,
        client_port: *mut Opaque,
        sender_buffer: *mut c_void,
        sender_buffer_length: u32,
        reply_buffer: *mut c_void,
        reply_length: *mut u32,
        timeout: *mut i64,
    ) -> NtStatus;
    pub fn FltGetFileNameInformation(
        data: *mut FltCallbackData,
        name_options: u32,
        file_name_information: *mut *mut FltFileNameInformation,
    ) -> NtStatus;
    pub fn FltReleaseFileNameInformation(file_name_information: *mut FltFileNameInformation);
    pub fn FltLockUserBuffer(data: *mut FltCallbackData) -> NtStatus;
    /// `EX_PUSH_LOCK` is one pointer-sized word.
    pub fn FltInitializePushLock(push_lock: *mut usize);
    pub fn FltDeletePushLock(push_lock: *mut usize);
    pub fn FltAcquirePushLockShared(push_lock: *mut usize);
    pub fn FltAcquirePushLockExclusive(push_lock: *mut usize);
    pub fn FltReleasePushLock(push_lock: *mut usize);
    pub fn FltQueryInformationFile(
        instance: Opaque,
        file_object: Opaque,
        file_information: *mut c_void,
        length: u32,
        file_information_class: u32,
        length_returned: *mut u32,
    ) -> NtStatus;
}
