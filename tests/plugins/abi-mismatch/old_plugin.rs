// A plugin "built against an older bridgeflow-sdk": it exports the ABI stamp with another ABI
// version. It has no dependencies, so the test compiles it with plain rustc in a second.
#[repr(C)]
pub struct AbiStamp {
    pub magic: [u8; 8],
    pub abi_version: u32,
    pub sdk_version: [u8; 32],
}

#[no_mangle]
pub extern "C" fn bridgeflow_plugin_abi() -> AbiStamp {
    let mut v = [0u8; 32];
    v[..5].copy_from_slice(b"0.0.9");
    AbiStamp {
        magic: *b"BRFLOWPL",
        abi_version: 0,
        sdk_version: v,
    }
}
