//! A restricted unpickler: it builds a plain object graph from the pickles torch_dist uses
//! (`.metadata`, each item's `data.pkl`, `common.pt`) and executes nothing. A `GLOBAL` outside
//! the allow-list is an error naming it. Python's `pickle` is the only full implementation and
//! runs code by design; no Rust crate reads these torch classes, so this is written here.
//!
//! Mutable containers (lists, dicts, objects) are shared through the memo exactly as in Python:
//! `Rc<RefCell<..>>`, so an item appended after memoization is seen through every reference.

use std::cell::RefCell;
use std::rc::Rc;

#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A class or function named by GLOBAL/STACK_GLOBAL (module, name).
    Global(String, String),
    /// NEWOBJ or REDUCE of an allowed global, with its BUILD state.
    Object(Rc<RefCell<Object>>),
    /// BINPERSID: a reference to a storage record of the archive.
    Persistent(Box<Value>),
}

#[derive(Debug, Clone)]
pub struct Object {
    pub module: String,
    pub name: String,
    pub args: Vec<Value>,
    pub state: Option<Value>,
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(v) => Some(v.clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
    /// The object's class as `module.name`, if this is an object.
    pub fn class(&self) -> Option<String> {
        match self {
            Value::Object(o) => {
                let o = o.borrow();
                Some(format!("{}.{}", o.module, o.name))
            }
            _ => None,
        }
    }
    /// A field of an object whose BUILD state is a dict (its `__dict__`).
    pub fn field(&self, key: &str) -> Option<Value> {
        let Value::Object(o) = self else { return None };
        let o = o.borrow();
        match o.state.as_ref()? {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    }
    pub fn dict_entries(&self) -> Option<Vec<(Value, Value)>> {
        match self {
            Value::Dict(d) => Some(d.borrow().clone()),
            _ => None,
        }
    }
}

/// The classes torch_dist pickles refer to; nothing else is accepted.
const ALLOWED: &[(&str, &str)] = &[
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    (
        "torch.distributed.checkpoint.metadata",
        "TensorStorageMetadata",
    ),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    (
        "torch.distributed.checkpoint.metadata",
        "ChunkStorageMetadata",
    ),
    (
        "torch.distributed.checkpoint.metadata",
        "BytesStorageMetadata",
    ),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    (
        "torch.distributed.checkpoint.metadata",
        "_MEM_FORMAT_ENCODING",
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.serialization", "_get_layout"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    // Megatron-LM's own checkpoints (`model_optim_rng.pt`): the run's arguments, bytes as
    // protocol 2 writes them, Transformer Engine's extra state.
    ("argparse", "Namespace"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("_io", "BytesIO"),
    ("io", "BytesIO"),
];

fn allowed(module: &str, name: &str) -> bool {
    if ALLOWED.iter().any(|(m, n)| *m == module && *n == name) {
        return true;
    }
    // dtypes (torch.float32, ...) and storage classes (torch.FloatStorage, ...).
    let torch = module == "torch"
        && (crate::dtypes::from_torch(name).is_some()
            || crate::dtypes::from_storage(name).is_some());
    // Enums and config classes Megatron-LM keeps in its arguments: recorded, never called.
    let megatron = (module.starts_with("megatron.core.")
        || module.starts_with("megatron.training."))
        && name.chars().next().is_some_and(|c| c.is_ascii_uppercase());
    torch || megatron
}

pub fn load(data: &[u8], what: &str) -> Result<Value, String> {
    Unpickler {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Vec::new(),
    }
    .run()
    .map_err(|e| format!("{what}: {e}"))
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: Vec<Option<Value>>,
}

impl Unpickler<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated pickle: wants {n} bytes at offset {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or("pickle MARK missing")?;
        if m > self.stack.len() {
            return Err("pickle MARK past the stack".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }
    fn string(&mut self, n: usize) -> Result<Value, String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map(Value::Str)
            .map_err(|_| "invalid UTF-8 in a pickled string".into())
    }
    fn memo_put(&mut self, idx: usize) -> Result<(), String> {
        let v = self.stack.last().cloned().ok_or("pickle stack underflow")?;
        if self.memo.len() <= idx {
            if idx > 10_000_000 {
                return Err("pickle memo index out of range".into());
            }
            self.memo.resize(idx + 1, None);
        }
        self.memo[idx] = Some(v);
        Ok(())
    }
    fn memo_get(&mut self, idx: usize) -> Result<(), String> {
        let v = self
            .memo
            .get(idx)
            .cloned()
            .flatten()
            .ok_or_else(|| format!("pickle memo {idx} is empty"))?;
        self.stack.push(v);
        Ok(())
    }
    fn global(&mut self, module: String, name: String) -> Result<(), String> {
        if !allowed(&module, &name) {
            return Err(format!(
                "refers to {module}.{name}, which is not one of the classes a torch_dist checkpoint uses; refusing to load it"
            ));
        }
        self.stack.push(Value::Global(module, name));
        Ok(())
    }
    fn instantiate(&mut self, callable: Value, args: Vec<Value>) -> Result<(), String> {
        match callable {
            Value::Global(module, name) => {
                self.stack.push(Value::Object(Rc::new(RefCell::new(Object {
                    module,
                    name,
                    args,
                    state: None,
                }))));
                Ok(())
            }
            other => Err(format!("pickle calls a non-class value {other:?}")),
        }
    }
    fn set_items(target: &Value, items: Vec<Value>) -> Result<(), String> {
        let Value::Dict(d) = target else {
            // OrderedDict and other dict-like objects: keep the pairs as their state.
            if let Value::Object(o) = target {
                let mut o = o.borrow_mut();
                let pairs = match o.state.take() {
                    Some(Value::Dict(d)) => d,
                    _ => Rc::new(RefCell::new(Vec::new())),
                };
                for kv in items.chunks(2) {
                    if let [k, v] = kv {
                        pairs.borrow_mut().push((k.clone(), v.clone()));
                    }
                }
                o.state = Some(Value::Dict(pairs));
                return Ok(());
            }
            return Err("SETITEM on a value that is not a dict".into());
        };
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of values".into());
        }
        let mut d = d.borrow_mut();
        for kv in items.chunks(2) {
            // A repeated key replaces the earlier value, as in a Python dict (compared as text).
            let key = kv[0].clone();
            if let Some(slot) = d.iter_mut().find(|(k, _)| same_key(k, &key)) {
                slot.1 = kv[1].clone();
            } else {
                d.push((key, kv[1].clone()));
            }
        }
        Ok(())
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if !(2..=5).contains(&p) {
                        return Err(format!("pickle protocol {p} is not supported (2 to 5 are)"));
                    }
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b')' => self.stack.push(Value::Tuple(vec![])),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b']' => self.stack.push(Value::List(Rc::new(RefCell::new(vec![])))),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        _ => return Err("APPEND to a value that is not a list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        _ => return Err("APPENDS to a value that is not a list".into()),
                    }
                }
                b'}' => self.stack.push(Value::Dict(Rc::new(RefCell::new(vec![])))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::new(RefCell::new(vec![])));
                    Self::set_items(&d, items)?;
                    self.stack.push(d);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?.clone();
                    Self::set_items(&target, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    Self::set_items(&target, items)?;
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v));
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.stack.push(Value::Int(v));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    if n > 8 {
                        return Err(format!("integer of {n} bytes is too large"));
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                0x8e => {
                    let n = self.u64()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack
                        .push(Value::Str(String::from_utf8_lossy(&b).into_owned()));
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack
                        .push(Value::Str(String::from_utf8_lossy(&b).into_owned()));
                }
                0x94 => {
                    let idx = self.memo.len();
                    self.memo_put(idx)?;
                }
                b'q' => {
                    let i = self.u8()? as usize;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()? as usize;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as usize;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()? as usize;
                    self.memo_get(i)?;
                }
                b'c' => {
                    let rest = &self.data[self.pos..];
                    let nl1 = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or("GLOBAL without a newline")?;
                    let module = String::from_utf8_lossy(&rest[..nl1]).into_owned();
                    let rest2 = &rest[nl1 + 1..];
                    let nl2 = rest2
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or("GLOBAL without a newline")?;
                    let name = String::from_utf8_lossy(&rest2[..nl2]).into_owned();
                    self.pos += nl1 + nl2 + 2;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(m, n)?,
                        _ => return Err("STACK_GLOBAL without two strings".into()),
                    }
                }
                b'R' => {
                    let args = self
                        .pop()?
                        .items()
                        .ok_or("REDUCE arguments are not a tuple")?;
                    let callable = self.pop()?;
                    self.instantiate(callable, args)?;
                }
                0x81 => {
                    let args = self
                        .pop()?
                        .items()
                        .ok_or("NEWOBJ arguments are not a tuple")?;
                    let cls = self.pop()?;
                    self.instantiate(cls, args)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    match self.top()? {
                        Value::Object(o) => o.borrow_mut().state = Some(state),
                        _ => return Err("BUILD on a value that is not an object".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(Value::Persistent(Box::new(pid)));
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at offset {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }
}

fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_state_none_list() {
        // torch.save([None])'s data.pkl, from the spec.
        let v = load(&[0x80, 0x02, 0x5d, 0x71, 0x00, 0x4e, 0x61, 0x2e], "t").unwrap();
        let items = v.items().unwrap();
        assert!(matches!(items.as_slice(), [Value::None]));
    }

    #[test]
    fn unknown_globals_are_refused() {
        // PROTO 2, GLOBAL os\nsystem\n, STOP
        let mut p = vec![0x80, 0x02, b'c'];
        p.extend_from_slice(b"os\nsystem\n");
        p.push(b'.');
        let e = load(&p, "evil.pkl").unwrap_err();
        assert!(e.contains("os.system") && e.contains("refusing"), "{e}");
    }

    #[test]
    fn long1_and_memo_sharing() {
        // [2**40, -1] as LONG1 / BININT; a list memoized then appended to is the same object.
        let mut p = vec![0x80, 0x04, b']', 0x94, 0x8a, 6, 0, 0, 0, 0, 0, 1, b'a'];
        p.extend_from_slice(&[b'J', 0xff, 0xff, 0xff, 0xff, b'a', b'h', 0, 0x86, b'.']);
        let v = load(&p, "t").unwrap();
        let t = v.items().unwrap();
        let first = t[0].items().unwrap();
        assert_eq!(first[0].as_int(), Some(1i64 << 40));
        assert_eq!(first[1].as_int(), Some(-1));
        assert_eq!(t[1].items().unwrap().len(), 2, "memo shares the list");
    }

    #[test]
    fn truncated_is_an_error() {
        assert!(load(&[0x80, 0x02, 0x8c, 10, b'a'], "t")
            .unwrap_err()
            .contains("truncated"));
    }
}
