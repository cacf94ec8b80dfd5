//! Every plugin crate exports the same entry points (`bridgeflow_plugin_abi`, the abi_stable
//! root-module header) for the host to find in its cdylib. Linked as rlibs into one fuzz binary,
//! those definitions collide; they are never looked up here, so the first one is kept.
fn main() {
    println!("cargo:rustc-link-arg=-Wl,--allow-multiple-definition");
}
