//! Reading the `torch.save` zip archives that every torch_dist item is: STORED records, found
//! through the central directory (ZIP64 aware), returned as views of the item's bytes. A
//! record's CRC-32 is checked when it is read.

use std::ops::Range;

pub struct Entry {
    pub name: String,
    pub data: Range<usize>,
    pub crc: u32,
}

// Every offset and size below comes from the file: sums are checked (None, "corrupt", on
// overflow) and every range is taken with `get`, so a hostile archive is refused, never read
// out of bounds or made to panic.
fn at(b: &[u8], i: usize, n: usize) -> Option<&[u8]> {
    b.get(i..i.checked_add(n)?)
}
fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_le_bytes(at(b, i, 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(at(b, i, 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(at(b, i, 8)?.try_into().ok()?))
}
fn add(a: usize, b: usize) -> Option<usize> {
    a.checked_add(b)
}

/// The records of one archive (`b` is exactly the archive).
pub fn entries(b: &[u8]) -> Result<Vec<Entry>, String> {
    parse(b)
        .ok_or_else(|| "not a readable torch.save zip archive (truncated or corrupt)".to_string())?
}

fn parse(b: &[u8]) -> Option<Result<Vec<Entry>, String>> {
    let (count, cd_off) = directory(b)?;
    // Each record takes at least 46 bytes of the directory: a count beyond that is corrupt
    // (and is not trusted to size anything).
    if count > (b.len() / 46) as u64 {
        return Some(Err(format!(
            "the central directory claims {count} records, more than a {}-byte file holds",
            b.len()
        )));
    }
    let mut out = Vec::new();
    let mut p = usize::try_from(cd_off).ok()?;
    for _ in 0..count {
        match record(b, p)? {
            Ok((entry, next)) => {
                out.push(entry);
                p = next;
            }
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(out))
}

/// The end of central directory (ZIP64 aware): the record count and the directory's offset.
fn directory(b: &[u8]) -> Option<(u64, u64)> {
    // End of central directory: the last "PK\5\6" within the final 64 KiB + 22 bytes.
    let start = b.len().saturating_sub(22 + 65535);
    let eocd = (start..=b.len().checked_sub(22)?)
        .rev()
        .find(|&i| b[i..i + 4] == *b"PK\x05\x06")?;
    let mut count = u16_at(b, eocd + 10)? as u64;
    let mut cd_off = u32_at(b, eocd + 16)? as u64;
    // ZIP64: the locator sits just before the classic record.
    if eocd >= 20 && b[eocd - 20..eocd - 16] == *b"PK\x06\x07" {
        let z64 = usize::try_from(u64_at(b, eocd - 20 + 8)?).ok()?;
        if at(b, z64, 4)? == b"PK\x06\x06" {
            count = u64_at(b, add(z64, 32)?)?;
            cd_off = u64_at(b, add(z64, 48)?)?;
        }
    }
    Some((count, cd_off))
}

/// The central directory record at `p`, its data located through its local header, and where
/// the next record starts.
fn record(b: &[u8], p: usize) -> Option<Result<(Entry, usize), String>> {
    if at(b, p, 4)? != b"PK\x01\x02" {
        return Some(Err(format!("bad central directory record at byte {p}")));
    }
    let method = u16_at(b, add(p, 10)?)?;
    let crc = u32_at(b, add(p, 16)?)?;
    let mut csize = u32_at(b, add(p, 20)?)? as u64;
    let mut usize_ = u32_at(b, add(p, 24)?)? as u64;
    let name_len = u16_at(b, add(p, 28)?)? as usize;
    let extra_len = u16_at(b, add(p, 30)?)? as usize;
    let comment_len = u16_at(b, add(p, 32)?)? as usize;
    let mut local = u32_at(b, add(p, 42)?)? as u64;
    let name = String::from_utf8_lossy(at(b, add(p, 46)?, name_len)?).into_owned();
    let extra = add(add(p, 46)?, name_len)?;
    let end = zip64_extra(b, extra, extra_len, (&mut usize_, &mut csize, &mut local))?;
    if method != 0 {
        return Some(Err(format!(
            "record '{name}' is compressed (method {method}); torch_dist writes STORED records"
        )));
    }
    if csize != usize_ {
        return Some(Err(format!("record '{name}': stored sizes disagree")));
    }
    let l = usize::try_from(local).ok()?;
    if at(b, l, 4)? != b"PK\x03\x04" {
        return Some(Err(format!("record '{name}': bad local header")));
    }
    let data_start = add(
        add(add(l, 30)?, u16_at(b, add(l, 26)?)? as usize)?,
        u16_at(b, add(l, 28)?)? as usize,
    )?;
    let data_end = usize::try_from(csize)
        .ok()
        .and_then(|n| add(data_start, n))
        .filter(|&e| e <= b.len());
    let Some(data_end) = data_end else {
        return Some(Err(format!(
            "record '{name}' of {csize} bytes runs past the end of the item ({} bytes)",
            b.len()
        )));
    };
    let entry = Entry {
        name,
        data: data_start..data_end,
        crc,
    };
    Some(Ok((entry, add(end, comment_len)?)))
}

/// The ZIP64 extra field among a record's extra fields (`len` bytes from `e`): the
/// 0xFFFFFFFF fields, in order usize, csize, offset, each read only within its field. Returns
/// where the extra fields end.
fn zip64_extra(
    b: &[u8],
    mut e: usize,
    len: usize,
    (usize_, csize, local): (&mut u64, &mut u64, &mut u64),
) -> Option<usize> {
    let end = add(e, len)?;
    while add(e, 4)? <= end {
        let id = u16_at(b, e)?;
        let len = u16_at(b, e + 2)? as usize;
        let field_end = add(add(e, 4)?, len)?.min(end);
        if id == 1 {
            let mut q = e + 4;
            let next = |q: &mut usize| -> Option<u64> {
                if add(*q, 8)? > field_end {
                    return None;
                }
                let v = u64_at(b, *q)?;
                *q += 8;
                Some(v)
            };
            if *usize_ == 0xFFFF_FFFF {
                *usize_ = next(&mut q)?;
            }
            if *csize == 0xFFFF_FFFF {
                *csize = next(&mut q)?;
            }
            if *local == 0xFFFF_FFFF {
                *local = next(&mut q)?;
            }
        }
        e = add(add(e, 4)?, len)?;
    }
    Some(end)
}

/// The record whose name ends with `suffix` (archives prefix names with `archive/` or the file
/// stem), CRC-checked.
pub fn find<'a>(b: &'a [u8], entries: &[Entry], suffix: &str) -> Result<&'a [u8], String> {
    find_with(b, entries, suffix, &mut |_| {})
}

/// [`find`], telling `read` of each window of the record once its CRC has read it (a reader of
/// a memory map lets those pages go: a record larger than memory is then never resident whole).
pub fn find_with<'a>(
    b: &'a [u8],
    entries: &[Entry],
    suffix: &str,
    read: &mut dyn FnMut(&[u8]),
) -> Result<&'a [u8], String> {
    let e = entries
        .iter()
        .find(|e| {
            e.name.ends_with(suffix)
                && (e.name.len() == suffix.len()
                    || e.name[..e.name.len() - suffix.len()].ends_with('/'))
        })
        .ok_or_else(|| format!("no '{suffix}' record in the archive"))?;
    let data = &b[e.data.clone()];
    let mut crc = crc32fast::Hasher::new();
    for w in data.chunks(8 << 20) {
        crc.update(w);
        read(w);
    }
    if crc.finalize() != e.crc {
        return Err(format!(
            "record '{}' fails its CRC-32 check (corrupt)",
            e.name
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::{tensor_pickle, Archive};
    use bridgeflow_sdk::DType;

    /// A small torch.save archive (ZIP64 end records, as torch writes them) and where its end
    /// records are: (archive, ZIP64 end record, first central directory record).
    fn archive() -> (Vec<u8>, usize, usize) {
        let b = Archive::new("archive", tensor_pickle(DType::F32, &[2]), Some(8), "t").bytes();
        let eocd = b.len() - 22;
        let z64 = u64::from_le_bytes(b[eocd - 12..eocd - 4].try_into().unwrap()) as usize;
        let cd = u64::from_le_bytes(b[z64 + 48..z64 + 56].try_into().unwrap()) as usize;
        assert!(entries(&b).is_ok());
        (b, z64, cd)
    }

    /// Offsets, counts and sizes from the file that point anywhere: an error, never a panic
    /// (overflowing sums, out-of-range slices) or an allocation sized by them.
    #[test]
    fn hostile_offsets_and_sizes_are_refused() {
        let set = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        let (orig, z64, cd) = archive();
        let eocd = orig.len() - 22;
        let cases: Vec<(&str, usize, Vec<u8>, &str)> = vec![
            (
                "zip64 record far away",
                eocd - 12,
                u64::MAX.to_le_bytes().to_vec(),
                "corrupt",
            ),
            (
                "2^64 - 1 records",
                z64 + 32,
                u64::MAX.to_le_bytes().to_vec(),
                "claims",
            ),
            (
                "directory far away",
                z64 + 48,
                (u64::MAX - 1).to_le_bytes().to_vec(),
                "corrupt",
            ),
            (
                "directory in the middle",
                z64 + 48,
                7u64.to_le_bytes().to_vec(),
                "bad central",
            ),
            (
                "local header far away",
                cd + 42,
                u32::MAX.to_le_bytes().to_vec(),
                "corrupt",
            ),
            (
                "4 GiB record",
                cd + 20,
                [0xff; 8].to_vec(),
                "runs past the end",
            ),
            (
                "name past the end",
                cd + 28,
                u16::MAX.to_le_bytes().to_vec(),
                "corrupt",
            ),
        ];
        for (what, at, v, want) in cases {
            let mut b = orig.clone();
            set(&mut b, at, &v);
            let e = entries(&b).err().unwrap_or_else(|| panic!("{what}: read"));
            assert!(e.contains(want), "{what}: {e}");
        }
        // A ZIP64 extra field shorter than the sizes it stands for.
        let mut b = orig.clone();
        set(&mut b, cd + 20, &[0xff; 8]);
        let name_len = u16::from_le_bytes([b[cd + 28], b[cd + 29]]) as usize;
        let extra = [1u8, 0, 4, 0, 1, 2, 3, 4];
        set(&mut b, cd + 30, &(extra.len() as u16).to_le_bytes());
        b.splice(cd + 46 + name_len..cd + 46 + name_len, extra);
        assert!(entries(&b).is_err());
        // Truncated anywhere: an error.
        for n in [0, 10, 21, orig.len() / 2, orig.len() - 1] {
            assert!(entries(&orig[..n]).is_err(), "truncated to {n}");
        }
    }
}
