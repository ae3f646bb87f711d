//! Links the cdylib as a kernel driver when the target is Windows.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("windows") {
        // A native-subsystem image entered at DriverEntry, without the C runtime.
        for arg in [
            "/DRIVER",
            "/SUBSYSTEM:NATIVE",
            "/ENTRY:DriverEntry",
            "/NODEFAULTLIB",
        ] {
            println!("cargo::rustc-cdylib-link-arg={arg}");
        }
    }
}
