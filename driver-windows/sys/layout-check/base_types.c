/*
 * Cross-checks the base kernel types that sys/src/ffi.rs declares by hand
 * against MinGW-w64's ddk headers (Debian package gcc-mingw-w64-x86-64).
 * MinGW has no fltKernel.h, so the FLT_* structures are checked only by the
 * assertions in ffi.rs (values from ReactOS's fltkernel.h).
 *
 *   x86_64-w64-mingw32-gcc -fsyntax-only -I/usr/share/mingw-w64/include/ddk base_types.c
 */
#include <stddef.h>
#include <ntifs.h>

_Static_assert(sizeof(UNICODE_STRING) == 16, "UNICODE_STRING");
_Static_assert(offsetof(UNICODE_STRING, Buffer) == 8, "UNICODE_STRING.Buffer");

_Static_assert(sizeof(OBJECT_ATTRIBUTES) == 48, "OBJECT_ATTRIBUTES");
_Static_assert(offsetof(OBJECT_ATTRIBUTES, RootDirectory) == 8, "RootDirectory");
_Static_assert(offsetof(OBJECT_ATTRIBUTES, ObjectName) == 16, "ObjectName");
_Static_assert(offsetof(OBJECT_ATTRIBUTES, Attributes) == 24, "Attributes");
_Static_assert(offsetof(OBJECT_ATTRIBUTES, SecurityDescriptor) == 32, "SecurityDescriptor");
_Static_assert(offsetof(OBJECT_ATTRIBUTES, SecurityQualityOfService) == 40, "SecurityQualityOfService");
_Static_assert(OBJ_CASE_INSENSITIVE == 0x40 && OBJ_KERNEL_HANDLE == 0x200, "OBJ_*");

_Static_assert(sizeof(IO_STATUS_BLOCK) == 16, "IO_STATUS_BLOCK");
_Static_assert(offsetof(IO_STATUS_BLOCK, Information) == 8, "Information");

_Static_assert(sizeof(MDL) == 48, "MDL");
_Static_assert(offsetof(MDL, MdlFlags) == 10, "MdlFlags");
_Static_assert(offsetof(MDL, MappedSystemVa) == 24, "MappedSystemVa");
_Static_assert(offsetof(MDL, ByteCount) == 40, "ByteCount");
_Static_assert(MDL_MAPPED_TO_SYSTEM_VA == 0x0001 && MDL_SOURCE_IS_NONPAGED_POOL == 0x0004, "MDL_*");

_Static_assert(IRP_MJ_CREATE == 0x00 && IRP_MJ_WRITE == 0x04, "IRP_MJ_*");
_Static_assert(IRP_MJ_SET_INFORMATION == 0x06 && IRP_MJ_CLEANUP == 0x12, "IRP_MJ_*");
_Static_assert(IRP_PAGING_IO == 0x00000002, "IRP_PAGING_IO");
_Static_assert(FileInternalInformation == 6, "FileInternalInformation");
_Static_assert(STANDARD_RIGHTS_ALL == 0x001F0000, "STANDARD_RIGHTS_ALL");
_Static_assert(MmCached == 1 && KernelMode == 0, "MmCached/KernelMode");
_Static_assert(NormalPagePriority == 16, "NormalPagePriority");
_Static_assert(STATUS_TIMEOUT == 0x102, "STATUS_TIMEOUT");
_Static_assert(STATUS_INSUFFICIENT_RESOURCES == (NTSTATUS)0xC000009A, "STATUS_INSUFFICIENT_RESOURCES");
_Static_assert(STATUS_INVALID_PARAMETER == (NTSTATUS)0xC000000D, "STATUS_INVALID_PARAMETER");
