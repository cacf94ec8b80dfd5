//! Inputs truncated or rewritten while mapped give errors naming the input, never SIGBUS. In
//! their own process: once an input is found changed, every later `inputs_intact` of the
//! process fails (as it must before a commit), which the SDK's other tests must not see.
#![cfg(target_os = "linux")]

use bridgeflow_sdk::{inputs_intact, Buffer, InputMap, MapView, PluginError};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

fn temp_file(name: &str, len: usize) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bf-inputs-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&vec![0xABu8; len]).unwrap();
    p
}

#[test]
fn touching_a_truncated_map_reads_zeros_and_the_input_is_named() {
    let p = temp_file("touched.bin", 64 << 10);
    let map = Arc::new(InputMap::open(&p).unwrap());
    // A tensor's zero-copy view, as readers hand them out.
    let buf = Buffer::from_owner(MapView {
        map: map.clone(),
        range: 4096..(64 << 10),
    });
    map.check().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(8192)
        .unwrap();
    // Without the guard this is SIGBUS: pages past the new end (8 KiB) are touched.
    let sum: u64 = buf.iter().map(|&b| b as u64).sum();
    assert_eq!(
        sum,
        0xAB * 4096,
        "the page still in the file is read, the rest as zeros"
    );
    assert!(map.is_poisoned());
    let e = map.check().unwrap_err();
    assert!(
        e.message.contains(&format!(
            "input {} was truncated while being read",
            p.display()
        )),
        "{e}"
    );
    let e = inputs_intact().unwrap_err();
    assert!(e.message.contains(&p.display().to_string()), "{e}");
    // A reader's complaint about the zeros is about the truncation.
    let e = map.explain(PluginError::format("CRC mismatch"));
    assert!(e.message.contains("truncated"), "{e}");
    // Still failing once every view and the map are gone (a writer commits after that).
    drop(buf);
    drop(map);
    let e = inputs_intact().unwrap_err();
    assert!(e.message.contains(&p.display().to_string()), "{e}");
}

#[test]
fn writing_out_of_a_truncated_map_names_the_input_not_bad_address() {
    let p = temp_file("written.bin", 256 << 10);
    let out = temp_file("out.bin", 0);
    let map = Arc::new(InputMap::open(&p).unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4096)
        .unwrap();
    // The kernel copies from the map: no SIGBUS, but EFAULT, as a writer's write_all_at gets.
    let f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
    let err = f.write_all_at(&map[64 << 10..], 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_efault()), "{err}");
    let e = PluginError::io(&out, "writing tensor 'w' to", err);
    assert!(
        e.message.contains(&format!(
            "input {} was truncated while being read",
            p.display()
        )),
        "{e}"
    );
    assert!(e.message.contains(&out.display().to_string()), "{e}");
    // The reader's check, when it next takes a tensor's bytes, says the same.
    assert!(map.check().unwrap_err().message.contains("truncated"));
}

fn libc_efault() -> i32 {
    14
}

#[test]
fn an_input_rewritten_in_place_is_changed() {
    let p = temp_file("rewritten.bin", 10_000);
    let map = InputMap::open(&p).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(&[1, 2, 3], 0)
        .unwrap();
    // The mtime moved (filesystems keep nanoseconds; make sure it is another tick).
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    let e = map.check().unwrap_err();
    assert!(
        e.message
            .contains(&format!("input {} changed while being read", p.display())),
        "{e}"
    );
}

#[test]
fn faults_elsewhere_are_still_fatal() {
    // A SIGBUS outside every registered map goes on to the previous handler (the default
    // action): run in a child, which must die of SIGBUS.
    if std::env::var_os("BF_INPUTS_CHILD").is_some() {
        let _guarded = InputMap::open(temp_file("guard-installed.bin", 4096)).unwrap();
        let p = temp_file("unguarded.bin", 64 << 10);
        let f = std::fs::File::open(&p).unwrap();
        let raw = unsafe { memmap2_map(&f, 64 << 10) };
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        let v = unsafe { std::ptr::read_volatile(raw.add(32 << 10)) };
        println!("survived: {v}");
        std::process::exit(0);
    }
    let exe = std::env::current_exe().unwrap();
    let o = std::process::Command::new(exe)
        .args(["--exact", "faults_elsewhere_are_still_fatal", "--nocapture"])
        .env("BF_INPUTS_CHILD", "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        o.status.signal(),
        Some(7),
        "{:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A plain read-only map outside the SDK's registry.
unsafe fn memmap2_map(f: &std::fs::File, len: usize) -> *const u8 {
    use std::os::fd::AsRawFd;
    extern "C" {
        fn mmap(addr: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut u8;
    }
    let p = mmap(std::ptr::null_mut(), len, 1, 2, f.as_raw_fd(), 0); // PROT_READ, MAP_PRIVATE
    assert!(!p.is_null() && p as isize != -1);
    p
}

#[test]
fn a_kernel_copy_from_a_truncated_input_names_the_input() {
    use bridgeflow_sdk::inputs::Origins;
    use bridgeflow_sdk::outfile::OutputFile;
    let p = temp_file("copied.bin", 256 << 10);
    let out = temp_file("copy-out.bin", 0);
    let map = Arc::new(InputMap::open(&p).unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4096)
        .unwrap();
    // The kernel copies what the file still has, then the input ends: the rest is written
    // from the map, which faults (EFAULT), and the error is about the input.
    let f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
    let mut o = OutputFile::new(f, &out).kernel_copy(Some(Arc::new(Origins::new())));
    let e = o.write_at(&map[..], 0).unwrap_err();
    assert!(
        e.message.contains(&format!(
            "input {} was truncated while being read",
            p.display()
        )),
        "{e}"
    );
    assert_eq!(o.stats().copied, 4096);
}
