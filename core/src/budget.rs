//! The global memory budget: bytes of tensor data in flight between stages, and apart from
//! them the bytes stateful stages retain.
//!
//! Every buffer a stage emits is wrapped once in an accounted owner that adds its bytes to the
//! count and removes them when the last view of the buffer is dropped, wherever that happens
//! (in a channel, in a writer, in a plugin that keeps it). Sources wait for room before
//! emitting. A single tensor larger than the whole budget is admitted when nothing else is in
//! flight.
//!
//! Downstream stages that make new buffers (a dequantizer turning 1 GB of FP4 codes into 4 GB of
//! bf16, a mapper reshuffling experts) wait too, but only while some of their own earlier output
//! is still alive: they can always emit when everything they made has drained, so their own
//! held input (counted, perhaps larger than the budget) never blocks them for good, and at most
//! what one call makes beyond the budget is in flight. If every other stage is idle and nothing
//! moves, nobody will free that output (a mapper keeping q until k and v arrive): admitted.
//!
//! One case would still deadlock: a stage that holds data until another source delivers more
//! (`verify` pairing two streams) while that source waits for room. The runtime reports which
//! stages are busy and how many items sit in channels; when a source has waited while nothing
//! was busy or queued for two consecutive checks, the pipeline cannot progress on its own, so
//! the source is admitted over budget (with a warning) rather than hang.
//!
//! A stateful stage (a trainer holding a model's weights, `retains_inputs` in its descriptor)
//! keeps what it receives on purpose. Each tensor it receives moves from in flight to retained
//! ([`Budget::retain`]): retained bytes are reported, but they never make a source wait, never
//! hold back the stage that made them, and never count toward an overdraft. The budget bounds
//! the data moving through the pipeline; what a stage decides to keep is the stage's own size.

use bridgeflow_sdk::{Buffer, BufferVTable};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Who waits for room: a source, or a downstream stage with its alive output.
enum Waiter<'a> {
    Source,
    Downstream(&'a AtomicU64),
}

#[derive(Default)]
struct State {
    in_flight: u64,
    peak: u64,
    retained: u64,
    peak_retained: u64,
}

pub struct Budget {
    limit: u64,
    state: Mutex<State>,
    freed: Condvar,
    cancelled: AtomicBool,
    /// Stages inside a plugin call that consumes input.
    busy: AtomicUsize,
    /// Items sent but not yet received.
    queued: AtomicUsize,
    overdrafts: AtomicUsize,
    /// Bytes consumers have said they are done with (`discard`): work going on out of the
    /// runtime's sight (a writer's own threads) shows here.
    discarded: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit: limit.max(1),
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
            cancelled: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            overdrafts: AtomicUsize::new(0),
            discarded: AtomicU64::new(0),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
    pub fn in_flight(&self) -> u64 {
        self.state.lock().unwrap().in_flight
    }
    /// The highest count seen during the run.
    pub fn peak(&self) -> u64 {
        self.state.lock().unwrap().peak
    }
    /// Bytes stateful stages hold now.
    pub fn retained(&self) -> u64 {
        self.state.lock().unwrap().retained
    }
    /// The most bytes stateful stages held at once.
    pub fn peak_retained(&self) -> u64 {
        self.state.lock().unwrap().peak_retained
    }

    /// Wakes every waiter and makes later waits fail.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.freed.notify_all();
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// A stage starts (true) or ends (false) consuming an item.
    pub fn set_busy(&self, busy: bool) {
        if busy {
            self.busy.fetch_add(1, Ordering::SeqCst);
        } else {
            self.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
    pub fn item_queued(&self) {
        self.queued.fetch_add(1, Ordering::SeqCst);
    }
    pub fn item_received(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }
    /// Times a source was admitted over budget to break a stall.
    pub fn overdrafts(&self) -> usize {
        self.overdrafts.load(Ordering::SeqCst)
    }

    /// Adds `bytes` to the count; when `wait`, first blocks until they fit. Returns false if the
    /// run was cancelled while waiting.
    fn acquire(&self, bytes: u64, wait: bool) -> bool {
        self.acquire_as(bytes, wait.then_some(Waiter::Source))
    }

    /// [`Self::acquire`] for a downstream stage whose alive output is `own`: waits for room only
    /// while some of that output is alive.
    fn acquire_downstream(&self, bytes: u64, own: &AtomicU64) -> bool {
        let ok = self.acquire_as(bytes, Some(Waiter::Downstream(own)));
        if ok {
            own.fetch_add(bytes, Ordering::SeqCst);
        }
        ok
    }

    /// The wait for room, by who waits (None: no wait). Waiting ends when the bytes fit, when
    /// nothing else is in flight (a source) or nothing of the stage's own output is (downstream),
    /// or when nothing can move: the other stages idle and neither the discard count nor the
    /// stage's own output changing for two checks — then the bytes are admitted over budget.
    fn acquire_as(&self, bytes: u64, waiter: Option<Waiter<'_>>) -> bool {
        let mut st = self.state.lock().unwrap();
        if let Some(w) = waiter {
            let own = |w: &Waiter<'_>| match w {
                Waiter::Source => 0,
                Waiter::Downstream(o) => o.load(Ordering::SeqCst),
            };
            let must_wait = |in_flight: u64| {
                in_flight + bytes > self.limit
                    && match w {
                        Waiter::Source => in_flight > 0,
                        Waiter::Downstream(o) => o.load(Ordering::SeqCst) > 0,
                    }
            };
            let mut idle_checks = 0;
            let mut seen = (self.discarded.load(Ordering::SeqCst), own(&w));
            while must_wait(st.in_flight) {
                if self.is_cancelled() {
                    return false;
                }
                let (guard, timeout) = self
                    .freed
                    .wait_timeout(st, Duration::from_millis(100))
                    .unwrap();
                st = guard;
                // A consumer still working through its data (discarding as it goes) is progress,
                // even when every stage has returned to the runtime.
                let now = (self.discarded.load(Ordering::SeqCst), own(&w));
                let progressing = now != seen;
                seen = now;
                // Besides the waiter itself, when it waits inside a stage call.
                let others_idle = self.queued.load(Ordering::SeqCst) == 0
                    && self.busy.load(Ordering::SeqCst)
                        <= matches!(w, Waiter::Downstream(_)) as usize;
                if !(timeout.timed_out() && others_idle && !progressing) {
                    idle_checks = 0;
                    continue;
                }
                idle_checks += 1;
                if idle_checks < 2 {
                    continue;
                }
                // A source's overdraft is news (a stage holds data for another source); a
                // downstream stage's is a mapper waiting for a tensor's other parts.
                if matches!(w, Waiter::Source)
                    && self.overdrafts.fetch_add(1, Ordering::SeqCst) == 0
                {
                    tracing::warn!(
                        in_flight = st.in_flight,
                        budget = self.limit,
                        "a stage holds data until another source delivers; admitting over the memory budget to keep going (raise --memory-budget)"
                    );
                }
                break;
            }
        }
        st.in_flight += bytes;
        st.peak = st.peak.max(st.in_flight);
        true
    }

    fn release(&self, bytes: u64, retained: bool) {
        let mut st = self.state.lock().unwrap();
        if retained {
            st.retained -= bytes;
        } else {
            st.in_flight -= bytes;
        }
        drop(st);
        self.freed.notify_all();
    }

    /// A stateful stage keeps `buf`: its bytes move from in flight to retained, and stop
    /// counting as the output of the stage that made it. Idempotent; buffers the budget never
    /// counted are left alone.
    pub fn retain(&self, buf: &Buffer) {
        if !std::ptr::eq(buf.vtable(), &ACCOUNTED) {
            return;
        }
        // SAFETY: accounted buffers' owner is an `Accounted` (see `wrap`), alive while `buf` is.
        let owner = unsafe { &*(buf.owner() as *const Accounted) };
        if owner.retained.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(own) = &owner.stage {
            own.fetch_sub(owner.bytes, Ordering::SeqCst);
        }
        let mut st = self.state.lock().unwrap();
        st.in_flight -= owner.bytes;
        st.retained += owner.bytes;
        st.peak_retained = st.peak_retained.max(st.retained);
        drop(st);
        self.freed.notify_all();
    }

    /// Wraps `buf` so that its bytes are counted until its last view is dropped. A buffer that
    /// is already accounted passes through unchanged (it is counted once, however many stages
    /// it crosses). Returns None if cancelled while waiting for room.
    pub fn account(self: &Arc<Self>, buf: Buffer, wait: bool) -> Option<Buffer> {
        if std::ptr::eq(buf.vtable(), &ACCOUNTED) {
            return Some(buf);
        }
        let bytes = buf.len() as u64;
        if !self.acquire(bytes, wait) {
            return None;
        }
        Some(self.wrap(buf, bytes, None))
    }

    /// [`Self::account`] for a stage downstream of the sources, whose new buffers are counted in
    /// `own` while alive and wait as [`Self::acquire_downstream`] says.
    pub fn account_downstream(
        self: &Arc<Self>,
        buf: Buffer,
        own: &Arc<AtomicU64>,
    ) -> Option<Buffer> {
        if std::ptr::eq(buf.vtable(), &ACCOUNTED) {
            return Some(buf);
        }
        let bytes = buf.len() as u64;
        if !self.acquire_downstream(bytes, own) {
            return None;
        }
        Some(self.wrap(buf, bytes, Some(own.clone())))
    }

    fn wrap(self: &Arc<Self>, buf: Buffer, bytes: u64, stage: Option<Arc<AtomicU64>>) -> Buffer {
        let (ptr, len) = (buf.as_slice().as_ptr(), buf.len());
        let owner = Arc::new(Accounted {
            _inner: buf,
            budget: self.clone(),
            bytes,
            stage,
            retained: AtomicBool::new(false),
        });
        // SAFETY: the view points into `_inner`, which the owner keeps alive; we hand over the
        // one strong count created by Arc::new.
        unsafe {
            Buffer::from_raw_parts(ptr, len, Arc::into_raw(owner) as *const c_void, &ACCOUNTED)
        }
    }

    /// Counts bytes that are not a buffer (record batches) for the lifetime of the guard.
    pub fn hold(self: &Arc<Self>, bytes: u64, wait: bool) -> Option<Hold> {
        if !self.acquire(bytes, wait) {
            return None;
        }
        Some(Hold {
            budget: self.clone(),
            bytes,
        })
    }
}

pub struct Hold {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.budget.release(self.bytes, false);
    }
}

struct Accounted {
    _inner: Buffer,
    budget: Arc<Budget>,
    bytes: u64,
    /// The alive-output count of the downstream stage that made it.
    stage: Option<Arc<AtomicU64>>,
    /// Kept by a stateful stage: counted as retained, no longer in `stage`'s output.
    retained: AtomicBool,
}

impl Drop for Accounted {
    fn drop(&mut self) {
        let retained = self.retained.load(Ordering::SeqCst);
        if let (Some(own), false) = (&self.stage, retained) {
            own.fetch_sub(self.bytes, Ordering::SeqCst);
        }
        self.budget.release(self.bytes, retained);
    }
}

unsafe extern "C" fn accounted_retain(ctx: *const c_void) {
    Arc::increment_strong_count(ctx as *const Accounted);
}
unsafe extern "C" fn accounted_release(ctx: *const c_void) {
    Arc::decrement_strong_count(ctx as *const Accounted);
}

unsafe extern "C" fn accounted_discard(ctx: *const c_void, ptr: *const u8, len: usize) {
    let owner = &*(ctx as *const Accounted);
    owner
        .budget
        .discarded
        .fetch_add(len as u64, Ordering::SeqCst);
    let inner = &owner._inner;
    let start = (ptr as usize).saturating_sub(inner.as_slice().as_ptr() as usize);
    inner.discard(start..start + len);
}

/// A static (not a const) so that its address identifies accounted buffers.
static ACCOUNTED: BufferVTable = BufferVTable {
    retain: accounted_retain,
    release: accounted_release,
    discard: Some(accounted_discard),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_until_last_view_drops() {
        let b = Budget::new(100);
        let buf = b.account(Buffer::from_vec(vec![0; 40]), true).unwrap();
        let view = buf.slice(0..10);
        assert_eq!(b.in_flight(), 40);
        let again = b.account(buf, true).unwrap(); // already accounted: not counted twice
        assert_eq!(b.in_flight(), 40);
        drop(again);
        assert_eq!(b.in_flight(), 40);
        drop(view);
        assert_eq!(b.in_flight(), 0);
        assert_eq!(b.peak(), 40);
    }

    #[test]
    fn waits_for_room_and_admits_oversized_alone() {
        let b = Budget::new(100);
        let big = b.account(Buffer::from_vec(vec![0; 500]), true).unwrap();
        assert_eq!(b.in_flight(), 500);
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.account(Buffer::from_vec(vec![0; 10]), true));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(b.in_flight(), 500, "must wait while over budget");
        drop(big);
        let small = t.join().unwrap().unwrap();
        assert_eq!(b.in_flight(), 10);
        drop(small);
    }

    #[test]
    fn a_consumer_discarding_as_it_goes_is_not_a_stall() {
        // Every stage has returned to the runtime (idle), but a writer's own thread is still
        // working through a buffer, discarding pages as it goes: the source waits, no overdraft.
        let b = Budget::new(100);
        let big = b.account(Buffer::from_vec(vec![0; 100]), true).unwrap();
        let worker = std::thread::spawn(move || {
            for i in 0..10 {
                std::thread::sleep(Duration::from_millis(60));
                big.discard(i * 10..(i + 1) * 10);
            }
            drop(big);
        });
        let small = b.account(Buffer::from_vec(vec![0; 10]), true).unwrap();
        worker.join().unwrap();
        assert_eq!(b.overdrafts(), 0);
        assert_eq!(b.in_flight(), 10);
        drop(small);

        // The same wait with nothing moving is a stall, broken by an overdraft.
        let held = b.account(Buffer::from_vec(vec![0; 100]), true).unwrap();
        let _more = b.account(Buffer::from_vec(vec![0; 10]), true).unwrap();
        assert_eq!(b.overdrafts(), 1);
        drop(held);
    }

    #[test]
    fn downstream_stages_wait_only_while_their_own_output_is_alive() {
        let b = Budget::new(100);
        // The stage's input, larger than the budget, does not block its first output.
        let input = b.account(Buffer::from_vec(vec![0; 300]), true).unwrap();
        let own = Arc::new(AtomicU64::new(0));
        let first = b
            .account_downstream(Buffer::from_vec(vec![0; 40]), &own)
            .unwrap();
        assert_eq!(own.load(Ordering::SeqCst), 40);
        // The second waits until the first is consumed (a busy consumer elsewhere).
        b.set_busy(true); // the stage itself, inside process()
        b.set_busy(true); // its consumer
        let (b2, own2) = (b.clone(), own.clone());
        let t =
            std::thread::spawn(move || b2.account_downstream(Buffer::from_vec(vec![0; 40]), &own2));
        std::thread::sleep(Duration::from_millis(350));
        assert!(!t.is_finished(), "must wait while its own output is alive");
        drop(first);
        b.set_busy(false);
        let second = t.join().unwrap().unwrap();
        assert_eq!(own.load(Ordering::SeqCst), 40);
        // With every other stage idle and nothing moving, it is admitted (no deadlock).
        let third = b
            .account_downstream(Buffer::from_vec(vec![0; 40]), &own)
            .unwrap();
        assert_eq!(own.load(Ordering::SeqCst), 80);
        drop((second, third, input));
        assert_eq!((b.in_flight(), own.load(Ordering::SeqCst)), (0, 0));
    }

    #[test]
    fn retained_bytes_block_nobody() {
        let b = Budget::new(100);
        let own = Arc::new(AtomicU64::new(0));
        let kept: Vec<Buffer> = (0..10)
            .map(|_| {
                let buf = b
                    .account_downstream(Buffer::from_vec(vec![0; 60]), &own)
                    .unwrap();
                b.retain(&buf);
                b.retain(&buf); // once only
                buf
            })
            .collect();
        assert_eq!(
            (b.in_flight(), b.retained(), own.load(Ordering::SeqCst)),
            (0, 600, 0)
        );
        // A source is not held back by the 600 retained bytes.
        let more = b.account(Buffer::from_vec(vec![0; 90]), true).unwrap();
        assert_eq!((b.in_flight(), b.overdrafts()), (90, 0));
        drop(kept);
        drop(more);
        assert_eq!(
            (b.in_flight(), b.retained(), b.peak_retained()),
            (0, 0, 600)
        );
    }

    #[test]
    fn cancel_wakes_waiters() {
        let b = Budget::new(10);
        let _hold = b.hold(10, true).unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.account(Buffer::from_vec(vec![0; 5]), true));
        std::thread::sleep(Duration::from_millis(20));
        b.cancel();
        assert!(t.join().unwrap().is_none());
    }
}
