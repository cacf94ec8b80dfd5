//! The archives and pickles of [`crate::emit`] read back by this crate's readers,
//! and against `torch.save`'s bytes.
#[cfg(test)]
mod tests {
    use crate::checkpoint::read_metadata;
    use crate::emit::*;
    use bridgeflow_sdk::DType;
    use std::path::Path;

    /// An item over 4 GiB: its frame carries ZIP64 sizes and offsets that place the payload
    /// where the layout said (laid into a sparse file; torch itself read a 4.4 GB item of ours,
    /// see scripts/check_zip64.py).
    #[test]
    fn items_over_4_gib_get_zip64_records() {
        use std::os::unix::fs::FileExt;
        let n: u64 = 5 << 30;
        let mut a = Archive::new("archive", tensor_pickle(DType::U8, &[n]), Some(n), "big");
        let (at, total) = (a.payload_offset().unwrap(), a.total);
        assert!(total > n && at % 64 == 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("item");
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(total).unwrap();
        for (off, b) in a.frame(0x1234_5678) {
            f.write_all_at(&b, off).unwrap();
        }
        // SAFETY: a private read-only map of a file this test owns.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let entries = crate::zip::entries(&map).unwrap();
        let payload = entries.iter().find(|e| e.name.ends_with("data/0")).unwrap();
        assert_eq!(payload.data, at as usize..(at + n) as usize);
        assert_eq!(payload.crc, 0x1234_5678);
        assert!(entries.iter().any(|e| e.name.ends_with("data.pkl")));
    }

    /// Our archive for a tensor equals megatron-core's `torch.save` output byte for byte (given
    /// the same random serialization id).
    #[test]
    fn tensor_archive_is_byte_identical_to_torch_save() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/shared/mcore/tp1");
        let meta = read_metadata(&dir).unwrap();
        let data = std::fs::read(dir.join("__0_0.distcp")).unwrap();
        for (key, t) in &meta.tensors {
            for c in &t.chunks {
                let item = &data
                    [c.storage.offset as usize..(c.storage.offset + c.storage.length) as usize];
                let entries = crate::zip::entries(item).unwrap();
                let sid = crate::zip::find(item, &entries, ".data/serialization_id").unwrap();
                let payload = crate::zip::find(item, &entries, "data/0").unwrap();
                let pkl = tensor_pickle(t.dtype, &c.sizes);
                assert_eq!(
                    pkl,
                    crate::zip::find(item, &entries, "data.pkl").unwrap(),
                    "{key}: data.pkl"
                );
                let mut a = Archive::with_id(
                    "archive",
                    pkl,
                    &[payload.len() as u64],
                    String::from_utf8(sid.to_vec()).unwrap(),
                );
                assert_eq!(a.total as usize, item.len(), "{key}: archive size");
                let mut ours = vec![0u8; item.len()];
                let p = a.payload_offset().unwrap() as usize;
                ours[p..p + payload.len()].copy_from_slice(payload);
                for (off, b) in a.frame(crc32fast::hash(payload)) {
                    ours[off as usize..off as usize + b.len()].copy_from_slice(&b);
                }
                assert!(
                    ours == item,
                    "{key} {:?}: archive differs from torch.save's",
                    c.offsets
                );
            }
        }
        // And a byte object: torch.save([None]).
        let (_, s) = meta
            .bytes
            .iter()
            .find(|(k, _)| k.contains("_extra_state"))
            .unwrap();
        let item = &data[s.offset as usize..(s.offset + s.length) as usize];
        let entries = crate::zip::entries(item).unwrap();
        let sid = crate::zip::find(item, &entries, ".data/serialization_id").unwrap();
        let ours = Archive::with_id(
            "archive",
            none_list_pickle(),
            &[],
            String::from_utf8(sid.to_vec()).unwrap(),
        )
        .bytes();
        assert!(ours == item, "byte object archive differs");
    }

    #[test]
    fn ints_are_encoded_as_python_does() {
        let mut p = Pickler::new();
        p.mark();
        for v in [
            0i64,
            255,
            256,
            65535,
            65536,
            -1,
            1 << 31,
            (1 << 40) + 5,
            -(1 << 40),
        ] {
            p.int(v);
        }
        p.tuple(9);
        let got = crate::pickle::load(&p.finish(), "t")
            .unwrap()
            .items()
            .unwrap();
        let ints: Vec<i64> = got.iter().map(|x| x.as_int().unwrap()).collect();
        assert_eq!(
            ints,
            vec![
                0,
                255,
                256,
                65535,
                65536,
                -1,
                1 << 31,
                (1 << 40) + 5,
                -(1 << 40)
            ]
        );
    }
}
