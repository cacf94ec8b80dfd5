//! Reference-counted byte buffers that cross the plugin boundary without a copy.
//!
//! A [`Buffer`] is a view (pointer + length) plus an opaque owner context and a vtable of
//! `retain`/`release` callbacks, the idea of DLPack's managed tensor. The callbacks are code of
//! the library that created the owner, so a memory map opened by one plugin can be read by
//! another and freed by the first, whatever allocator each was built with.

use abi_stable::StableAbi;
use std::ffi::c_void;
use std::ops::{Deref, Range};
use std::sync::{Arc, Mutex};

/// Callbacks that keep a buffer's owner alive. All must be thread-safe.
#[repr(C)]
#[derive(StableAbi)]
pub struct BufferVTable {
    pub retain: unsafe extern "C" fn(ctx: *const c_void),
    pub release: unsafe extern "C" fn(ctx: *const c_void),
    /// "This consumer is done with bytes `ptr..ptr+len`": the owner may drop their residency,
    /// but the bytes must stay readable (a memory map can release pages that the file backs;
    /// heap memory ignores it). Lets a writer stream a tensor larger than the memory budget
    /// without its whole mapping becoming resident.
    pub discard: Option<unsafe extern "C" fn(ctx: *const c_void, ptr: *const u8, len: usize)>,
}

/// An immutable, shareable byte view whose memory is owned elsewhere.
#[repr(C)]
#[derive(StableAbi)]
pub struct Buffer {
    ptr: *const u8,
    len: usize,
    ctx: *const c_void,
    vtable: &'static BufferVTable,
}

// SAFETY: the bytes are immutable while any Buffer refers to them, and the vtable contract
// requires thread-safe retain/release.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

/// Anything that owns stable bytes can back a buffer (Vec, memory map, ...).
pub trait BufferOwner: Send + Sync + 'static {
    fn bytes(&self) -> &[u8];
    /// A consumer is done with `range` of [`Self::bytes`]; drop its residency if that is
    /// possible without changing what the bytes read as. Default: nothing.
    fn discard(&self, _range: Range<usize>) {}
}

impl BufferOwner for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}
impl BufferOwner for memmap2::Mmap {
    fn bytes(&self) -> &[u8] {
        self
    }
}
impl BufferOwner for &'static [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
}

unsafe extern "C" fn arc_retain<O: BufferOwner>(ctx: *const c_void) {
    Arc::increment_strong_count(ctx as *const O);
}
unsafe extern "C" fn arc_release<O: BufferOwner>(ctx: *const c_void) {
    Arc::decrement_strong_count(ctx as *const O);
}
unsafe extern "C" fn arc_discard<O: BufferOwner>(ctx: *const c_void, ptr: *const u8, len: usize) {
    let owner = &*(ctx as *const O);
    let base = owner.bytes().as_ptr() as usize;
    let start = (ptr as usize).saturating_sub(base);
    owner.discard(start..start + len);
}

trait ArcVTable {
    const VTABLE: &'static BufferVTable;
}
impl<O: BufferOwner> ArcVTable for O {
    const VTABLE: &'static BufferVTable = &BufferVTable {
        retain: arc_retain::<O>,
        release: arc_release::<O>,
        discard: Some(arc_discard::<O>),
    };
}

impl Buffer {
    /// Wraps an owner; the view covers all of its bytes.
    pub fn from_owner<O: BufferOwner>(owner: O) -> Buffer {
        let arc = Arc::new(owner);
        let bytes = arc.bytes();
        let (ptr, len) = (bytes.as_ptr(), bytes.len());
        Buffer {
            ptr,
            len,
            ctx: Arc::into_raw(arc) as *const c_void,
            vtable: <O as ArcVTable>::VTABLE,
        }
    }

    /// Wraps a shared owner and views `range` of its bytes.
    pub fn from_arc_range<O: BufferOwner>(owner: Arc<O>, range: Range<usize>) -> Buffer {
        let bytes = &owner.bytes()[range];
        let (ptr, len) = (bytes.as_ptr(), bytes.len());
        Buffer {
            ptr,
            len,
            ctx: Arc::into_raw(owner) as *const c_void,
            vtable: <O as ArcVTable>::VTABLE,
        }
    }

    pub fn from_vec(v: Vec<u8>) -> Buffer {
        Buffer::from_owner(v)
    }

    pub fn from_static(b: &'static [u8]) -> Buffer {
        Buffer::from_owner(b)
    }

    /// Builds a buffer from raw parts. The caller hands over one reference: `release(ctx)` will
    /// be called once when this buffer (and every clone, after their own retain) is dropped.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid and immutable until the matching release.
    pub unsafe fn from_raw_parts(
        ptr: *const u8,
        len: usize,
        ctx: *const c_void,
        vtable: &'static BufferVTable,
    ) -> Buffer {
        Buffer {
            ptr,
            len,
            ctx,
            vtable,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: guaranteed by the constructor contracts.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// A sub-view sharing the same owner (no copy).
    pub fn slice(&self, range: Range<usize>) -> Buffer {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "Buffer::slice {range:?} out of bounds of {} bytes",
            self.len
        );
        // SAFETY: retain before handing out a second reference.
        unsafe { (self.vtable.retain)(self.ctx) };
        Buffer {
            ptr: unsafe { self.ptr.add(range.start) },
            len: range.end - range.start,
            ctx: self.ctx,
            vtable: self.vtable,
        }
    }

    /// Tells the owner this consumer is done with `range` of this view (see
    /// [`BufferVTable::discard`]). Always safe: the bytes stay readable.
    pub fn discard(&self, range: Range<usize>) {
        let range = range.start.min(self.len)..range.end.min(self.len);
        if range.is_empty() {
            return;
        }
        if let Some(f) = self.vtable.discard {
            unsafe { f(self.ctx, self.ptr.add(range.start), range.end - range.start) };
        }
    }

    /// The owner identity (for hosts that wrap buffers and must recognise their own).
    pub fn vtable(&self) -> &'static BufferVTable {
        self.vtable
    }

    /// The owner's context pointer, meaningful only to the code that built the buffer (a host
    /// recognising its own buffers by [`Buffer::vtable`] reads its owner through it).
    pub fn owner(&self) -> *const c_void {
        self.ctx
    }
}

impl Clone for Buffer {
    fn clone(&self) -> Self {
        unsafe { (self.vtable.retain)(self.ctx) };
        Buffer {
            ptr: self.ptr,
            len: self.len,
            ctx: self.ctx,
            vtable: self.vtable,
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        unsafe { (self.vtable.release)(self.ctx) };
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({} bytes)", self.len)
    }
}

/// Drops this process's residency of `map[range]` (whole pages only: rounded outward, or inward
/// when neighbours may still be in use). The map is read-only and file-backed, so released
/// pages are read again from the page cache if anything touches them: nothing can change or
/// be lost, and resident memory follows what is in flight rather than everything read.
pub fn release_pages(map: &memmap2::Mmap, range: Range<usize>, outward: bool) {
    const PAGE: usize = 4096;
    let (a, b) = if outward {
        (
            range.start / PAGE * PAGE,
            (range.end.div_ceil(PAGE) * PAGE).min(map.len()),
        )
    } else {
        (range.start.div_ceil(PAGE) * PAGE, range.end / PAGE * PAGE)
    };
    if b > a {
        // SAFETY: see above; DONTNEED on a private read-only file mapping only drops residency.
        unsafe {
            let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a);
        }
    }
}

/// A read-only memory map whose pages can be let go: a plain [`memmap2::Mmap`], or an input
/// map guarded against truncation ([`crate::InputMap`]).
pub trait MappedBytes: Send + Sync + 'static {
    fn mapped(&self) -> &[u8];
    /// See [`release_pages`].
    fn release(&self, range: Range<usize>, outward: bool);
}

impl MappedBytes for memmap2::Mmap {
    fn mapped(&self) -> &[u8] {
        self
    }
    fn release(&self, range: Range<usize>, outward: bool) {
        release_pages(self, range, outward);
    }
}

impl MappedBytes for crate::InputMap {
    fn mapped(&self) -> &[u8] {
        self
    }
    fn release(&self, range: Range<usize>, outward: bool) {
        self.release_pages(range, outward);
    }
}

/// A view of part of a shared memory map as a buffer owner: consumers' `discard` and the last
/// view's drop release its pages (see [`release_pages`]).
pub struct MapView<M: MappedBytes = memmap2::Mmap> {
    pub map: Arc<M>,
    pub range: Range<usize>,
}

impl<M: MappedBytes> BufferOwner for MapView<M> {
    fn bytes(&self) -> &[u8] {
        &self.map.mapped()[self.range.clone()]
    }
    fn discard(&self, r: Range<usize>) {
        self.map
            .release(self.range.start + r.start..self.range.start + r.end, false);
    }
}

impl<M: MappedBytes> Drop for MapView<M> {
    fn drop(&mut self) {
        self.map.release(self.range.clone(), true);
    }
}

/// A pool of output allocations. Fresh allocations cost a page fault per 4 KiB on first touch
/// (~0.7 s/GiB measured on the 2-core machines), so stages that produce new tensors (casts,
/// fusions) take their output from a pool; the memory comes back when the last view of the
/// buffer is dropped, wherever that happens.
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    free: Mutex<Vec<Vec<u8>>>,
    /// Upper bound of bytes kept idle in the pool.
    max_idle_bytes: usize,
}

impl BufferPool {
    pub fn new(max_idle_bytes: usize) -> Self {
        BufferPool {
            inner: Arc::new(PoolInner {
                free: Mutex::new(Vec::new()),
                max_idle_bytes,
            }),
        }
    }

    /// A zero-filled vector of `len` bytes, reusing a pooled allocation when one fits.
    pub fn take(&self, len: usize) -> PooledVec {
        let reused = {
            let mut free = self.inner.free.lock().unwrap();
            // Best fit: the smallest idle allocation that is large enough.
            let pos = free
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= len)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            pos.map(|i| free.swap_remove(i))
        };
        let mut vec = reused.unwrap_or_default();
        vec.clear();
        vec.resize(len, 0);
        PooledVec {
            vec,
            pool: self.inner.clone(),
        }
    }

    /// Bytes currently idle in the pool.
    pub fn idle_bytes(&self) -> usize {
        self.inner
            .free
            .lock()
            .unwrap()
            .iter()
            .map(|v| v.capacity())
            .sum()
    }
}

/// A writable allocation that returns to its pool when dropped.
pub struct PooledVec {
    vec: Vec<u8>,
    pool: Arc<PoolInner>,
}

impl PooledVec {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec
    }
    /// Freezes into a shareable buffer; the allocation returns to the pool after the last view.
    pub fn freeze(self) -> Buffer {
        Buffer::from_owner(self)
    }
}

impl BufferOwner for PooledVec {
    fn bytes(&self) -> &[u8] {
        &self.vec
    }
}

impl Drop for PooledVec {
    fn drop(&mut self) {
        let vec = std::mem::take(&mut self.vec);
        if vec.capacity() == 0 {
            return;
        }
        let mut free = self.pool.free.lock().unwrap();
        let idle: usize = free.iter().map(|v| v.capacity()).sum();
        if idle + vec.capacity() <= self.pool.max_idle_bytes {
            free.push(vec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static DROPS: AtomicUsize = AtomicUsize::new(0);
    struct Counted(Vec<u8>);
    impl BufferOwner for Counted {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
    }
    impl Drop for Counted {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn owner_lives_until_last_view() {
        let b = Buffer::from_owner(Counted(vec![1, 2, 3, 4]));
        let s = b.slice(1..3);
        let c = s.clone();
        drop(b);
        drop(s);
        assert_eq!(DROPS.load(Ordering::SeqCst), 0);
        assert_eq!(&*c, &[2, 3]);
        drop(c);
        assert_eq!(DROPS.load(Ordering::SeqCst), 1);
    }

    struct Recorder(Vec<u8>, Mutex<Vec<std::ops::Range<usize>>>);
    impl BufferOwner for Recorder {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
        fn discard(&self, range: std::ops::Range<usize>) {
            self.1.lock().unwrap().push(range);
        }
    }

    #[test]
    fn discard_reaches_the_owner_in_owner_coordinates() {
        let owner = Arc::new(Recorder(vec![0; 100], Mutex::new(Vec::new())));
        let b = Buffer::from_arc_range(owner.clone(), 10..90);
        let s = b.slice(20..60); // owner bytes 30..70
        s.discard(5..15);
        s.discard(30..1000); // clamped to the view
        b.discard(0..0); // empty: not forwarded
        assert_eq!(*owner.1.lock().unwrap(), vec![35..45, 60..70]);
        // Heap buffers ignore it and keep their bytes.
        let v = Buffer::from_vec(vec![7; 8]);
        v.discard(0..8);
        assert_eq!(&*v, &[7; 8]);
    }

    #[test]
    fn pool_reuses_allocations() {
        let pool = BufferPool::new(1 << 20);
        let mut v = pool.take(1000);
        v.as_mut_slice()[0] = 7;
        let ptr = v.as_mut_slice().as_ptr();
        let buf = v.freeze();
        assert_eq!(buf[0], 7);
        drop(buf);
        assert!(pool.idle_bytes() >= 1000);
        let mut again = pool.take(500);
        assert_eq!(again.as_mut_slice().as_ptr(), ptr);
        assert!(again.as_mut_slice().iter().all(|&b| b == 0));
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn slice_out_of_bounds_panics() {
        Buffer::from_vec(vec![0; 4]).slice(2..8);
    }
}
