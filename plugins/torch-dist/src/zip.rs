//! Reading the `torch.save` zip archives that every torch_dist item is: STORED records, found
//! through the central directory (ZIP64 aware), returned as views of the item's bytes. A
//! record's CRC-32 is checked when it is read.

use std::ops::Range;

pub struct Entry {
    pub name: String,
    pub data: Range<usize>,
    pub crc: u32,
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// The records of one archive (`b` is exactly the archive).
pub fn entries(b: &[u8]) -> Result<Vec<Entry>, String> {
    parse(b)
        .ok_or_else(|| "not a readable torch.save zip archive (truncated or corrupt)".to_string())?
}

fn parse(b: &[u8]) -> Option<Result<Vec<Entry>, String>> {
    // End of central directory: the last "PK\5\6" within the final 64 KiB + 22 bytes.
    let start = b.len().saturating_sub(22 + 65535);
    let eocd = (start..=b.len().checked_sub(22)?)
        .rev()
        .find(|&i| b[i..i + 4] == *b"PK\x05\x06")?;
    let mut count = u16_at(b, eocd + 10)? as u64;
    let mut cd_off = u32_at(b, eocd + 16)? as u64;
    // ZIP64: the locator sits just before the classic record.
    if eocd >= 20 && b[eocd - 20..eocd - 16] == *b"PK\x06\x07" {
        let z64 = u64_at(b, eocd - 20 + 8)? as usize;
        if b.get(z64..z64 + 4)? == b"PK\x06\x06" {
            count = u64_at(b, z64 + 32)?;
            cd_off = u64_at(b, z64 + 48)?;
        }
    }
    let mut out = Vec::new();
    let mut p = cd_off as usize;
    for _ in 0..count {
        if b.get(p..p + 4)? != b"PK\x01\x02" {
            return Some(Err(format!("bad central directory record at byte {p}")));
        }
        let method = u16_at(b, p + 10)?;
        let crc = u32_at(b, p + 16)?;
        let mut csize = u32_at(b, p + 20)? as u64;
        let mut usize_ = u32_at(b, p + 24)? as u64;
        let name_len = u16_at(b, p + 28)? as usize;
        let extra_len = u16_at(b, p + 30)? as usize;
        let comment_len = u16_at(b, p + 32)? as usize;
        let mut local = u32_at(b, p + 42)? as u64;
        let name = String::from_utf8_lossy(b.get(p + 46..p + 46 + name_len)?).into_owned();
        // ZIP64 extra: the 0xFFFFFFFF fields, in order usize, csize, offset.
        let mut e = p + 46 + name_len;
        let end = e + extra_len;
        while e + 4 <= end {
            let id = u16_at(b, e)?;
            let len = u16_at(b, e + 2)? as usize;
            if id == 1 {
                let mut q = e + 4;
                if usize_ == 0xFFFF_FFFF {
                    usize_ = u64_at(b, q)?;
                    q += 8;
                }
                if csize == 0xFFFF_FFFF {
                    csize = u64_at(b, q)?;
                    q += 8;
                }
                if local == 0xFFFF_FFFF {
                    local = u64_at(b, q)?;
                }
            }
            e += 4 + len;
        }
        if method != 0 {
            return Some(Err(format!(
                "record '{name}' is compressed (method {method}); torch_dist writes STORED records"
            )));
        }
        if csize != usize_ {
            return Some(Err(format!("record '{name}': stored sizes disagree")));
        }
        let l = local as usize;
        if b.get(l..l + 4)? != b"PK\x03\x04" {
            return Some(Err(format!("record '{name}': bad local header")));
        }
        let data_start = l + 30 + u16_at(b, l + 26)? as usize + u16_at(b, l + 28)? as usize;
        let data_end = data_start.checked_add(csize as usize)?;
        if data_end > b.len() {
            return Some(Err(format!(
                "record '{name}' runs past the end of the item"
            )));
        }
        out.push(Entry {
            name,
            data: data_start..data_end,
            crc,
        });
        p += 46 + name_len + extra_len + comment_len;
    }
    Some(Ok(out))
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
