//! A restricted unpickler: it builds a plain object graph from the pickles torch_dist uses
//! (`.metadata`, each item's `data.pkl`, `common.pt`) and executes nothing. A `GLOBAL` outside
//! the allow-list is an error naming it. Python's `pickle` is the only full implementation and
//! runs code by design; no Rust crate reads these torch classes, so this is written here.
//!
//! Mutable containers (lists, dicts, objects) are shared through the memo exactly as in Python:
//! `Rc<RefCell<..>>`, so an item appended after memoization is seen through every reference.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// Shared like the containers: a memoized tuple fetched again is the same tuple (a clone
    /// is O(1), so `((t, t), (t, t))`-style pickles cannot blow up exponentially).
    Tuple(Rc<Vec<Value>>),
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
            Value::Tuple(v) => Some(v.to_vec()),
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
    /// A number, integer or float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            _ => self.as_int().map(|i| i as f64),
        }
    }
    /// The value under a string key of a dict (or of an `OrderedDict`, whose pairs are its
    /// state).
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v.clone()),
            _ => self.field(key),
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

/// The deepest nesting of containers accepted. Real checkpoints nest about 10 deep; a hostile
/// pickle nests one level per byte (`)` then TUPLE1 ...), and dropping or walking such a value
/// recursively overflows the stack.
const MAX_DEPTH: usize = 512;

pub fn load(data: &[u8], what: &str) -> Result<Value, String> {
    let mut u = Unpickler {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        dead: Vec::new(),
        keys: HashMap::new(),
        copied: 0,
    };
    let result = u.run().and_then(|v| match check_depth(&v) {
        Ok(()) => Ok(v),
        Err(e) => {
            dismantle(vec![v], true);
            Err(e)
        }
    });
    // What is left on the stack and in the memo is let go without recursion; on an error
    // everything is (containers emptied, so cycles are freed too).
    let mut rest = std::mem::take(&mut u.stack);
    rest.append(&mut u.dead);
    rest.extend(u.memo.drain().map(|(_, v)| v));
    rest.extend(u.keys.drain().map(|(_, (d, _))| d));
    dismantle(rest, result.is_err());
    result.map_err(|e| format!("{what}: {e}"))
}

/// The node identity of a shared value, if it is one.
fn node(v: &Value) -> Option<usize> {
    match v {
        Value::Tuple(t) => Some(Rc::as_ptr(t) as *const u8 as usize),
        Value::List(l) => Some(Rc::as_ptr(l) as *const u8 as usize),
        Value::Dict(d) => Some(Rc::as_ptr(d) as *const u8 as usize),
        Value::Object(o) => Some(Rc::as_ptr(o) as *const u8 as usize),
        _ => None,
    }
}

/// The values directly inside `v`.
fn children(v: &Value) -> Vec<Value> {
    match v {
        Value::Tuple(t) => t.to_vec(),
        Value::List(l) => l.borrow().clone(),
        Value::Dict(d) => d
            .borrow()
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .collect(),
        Value::Object(o) => {
            let o = o.borrow();
            o.args.iter().cloned().chain(o.state.clone()).collect()
        }
        Value::Persistent(p) => vec![(**p).clone()],
        _ => Vec::new(),
    }
}

/// Refuses a value graph with a cycle (a list holding itself: torch never pickles one, and any
/// walk of it would not end) or nested deeper than [`MAX_DEPTH`]; without recursion, each
/// shared node visited once.
fn check_depth(root: &Value) -> Result<(), String> {
    // Longest path below each finished node; nodes on the current path are "open".
    let mut done: HashMap<usize, usize> = HashMap::new();
    let mut open: std::collections::HashSet<usize> = std::collections::HashSet::new();
    // (value, its children still to visit, deepest child so far)
    let mut path: Vec<(Option<usize>, std::vec::IntoIter<Value>, usize)> =
        vec![(node(root), children(root).into_iter(), 0)];
    open.extend(node(root));
    while let Some((id, it, deepest)) = path.last_mut() {
        match it.next() {
            Some(c) => {
                let cid = node(&c);
                if let Some(d) = cid.and_then(|i| done.get(&i)) {
                    *deepest = (*deepest).max(*d + 1);
                    continue;
                }
                if cid.is_some_and(|i| open.contains(&i)) {
                    return Err("the pickle holds a cycle (a container inside itself)".into());
                }
                if path.len() >= MAX_DEPTH {
                    return Err(format!(
                        "the pickle nests containers more than {MAX_DEPTH} deep"
                    ));
                }
                open.extend(cid);
                path.push((cid, children(&c).into_iter(), 0));
            }
            None => {
                let (id, d) = (*id, *deepest);
                path.pop();
                if let Some(i) = id {
                    open.remove(&i);
                    done.insert(i, d);
                }
                if let Some((_, _, up)) = path.last_mut() {
                    *up = (*up).max(d + 1);
                }
            }
        }
    }
    Ok(())
}

/// Drops values without recursing into them: each container's contents are moved onto a work
/// list once its last reference goes (with `drain`, taken out of shared lists, dicts and
/// objects at once, which also breaks cycles: for values no one keeps).
fn dismantle(mut work: Vec<Value>, drain: bool) {
    fn take_object(o: &RefCell<Object>, work: &mut Vec<Value>) {
        let mut o = o.borrow_mut();
        work.append(&mut o.args);
        work.extend(o.state.take());
    }
    while let Some(v) = work.pop() {
        match v {
            Value::Tuple(t) => {
                if let Ok(items) = Rc::try_unwrap(t) {
                    work.extend(items);
                }
            }
            Value::List(l) => {
                if drain {
                    work.append(&mut l.borrow_mut());
                } else if let Ok(items) = Rc::try_unwrap(l) {
                    work.extend(items.into_inner());
                }
            }
            Value::Dict(d) => {
                let pairs = if drain {
                    std::mem::take(&mut *d.borrow_mut())
                } else {
                    match Rc::try_unwrap(d) {
                        Ok(p) => p.into_inner(),
                        Err(_) => continue,
                    }
                };
                for (k, v) in pairs {
                    work.push(k);
                    work.push(v);
                }
            }
            Value::Object(o) => {
                if drain {
                    take_object(&o, &mut work);
                } else if let Ok(o) = Rc::try_unwrap(o) {
                    take_object(&o, &mut work);
                }
            }
            Value::Persistent(p) => work.push(*p),
            _ => {}
        }
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    /// As Python's: a dict, so a far index costs one entry, not a table up to it.
    memo: HashMap<usize, Value>,
    /// Values let go while running, dropped without recursion at the end (a deep value
    /// dropped in place would recurse once per level).
    dead: Vec<Value>,
    /// Each dict's keys → their place, so a dict of n keys is built in O(n), not O(n²) (the
    /// dict is kept here too, so its address cannot be reused by another).
    keys: HashMap<usize, (Value, HashMap<DictKey, usize>)>,
    /// Elements copied out of argument tuples: a tuple fetched from the memo and passed to
    /// REDUCE again and again would copy it each time (n² memory from n bytes).
    copied: usize,
}

/// A dict key as Python compares the keys torch pickles (text, integers); other keys never match.
#[derive(PartialEq, Eq, Hash)]
enum DictKey {
    Str(String),
    Int(i64),
}

fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

fn dict_key(v: &Value) -> Option<DictKey> {
    match v {
        Value::Str(s) => Some(DictKey::Str(s.clone())),
        Value::Int(i) => Some(DictKey::Int(*i)),
        _ => None,
    }
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
        if let Some(old) = self.memo.insert(idx, v) {
            self.dead.push(old);
        }
        Ok(())
    }
    fn memo_get(&mut self, idx: usize) -> Result<(), String> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
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
            // Named by kind only: the value may be huge or hold itself.
            other => {
                let kind = match other {
                    Value::Object(_) => "an object",
                    Value::Tuple(_) | Value::List(_) | Value::Dict(_) => "a container",
                    _ => "a plain value",
                };
                self.dead.push(other);
                self.dead.extend(args);
                Err(format!("pickle calls {kind}, not a class"))
            }
        }
    }
    fn set_items(&mut self, target: &Value, items: Vec<Value>) -> Result<(), String> {
        let Value::Dict(d) = target else {
            // OrderedDict and other dict-like objects: keep the pairs as their state.
            if let Value::Object(o) = target {
                let mut o = o.borrow_mut();
                let pairs = match o.state.take() {
                    Some(Value::Dict(d)) => d,
                    other => {
                        self.dead.extend(other);
                        Rc::new(RefCell::new(Vec::new()))
                    }
                };
                for kv in items.chunks(2) {
                    if let [k, v] = kv {
                        pairs.borrow_mut().push((k.clone(), v.clone()));
                    }
                }
                o.state = Some(Value::Dict(pairs));
                return Ok(());
            }
            self.dead.extend(items);
            return Err("SETITEM on a value that is not a dict".into());
        };
        if !items.len().is_multiple_of(2) {
            self.dead.extend(items);
            return Err("SETITEMS with an odd number of values".into());
        }
        let id = Rc::as_ptr(d) as *const u8 as usize;
        // Small dicts (nearly all: objects' __dict__) by a scan; larger ones through an index.
        if !self.keys.contains_key(&id) && d.borrow().len() + items.len() / 2 <= 32 {
            let mut d = d.borrow_mut();
            let mut it = items.into_iter();
            while let (Some(key), Some(value)) = (it.next(), it.next()) {
                // A repeated key replaces the earlier value, as in a Python dict.
                match d.iter().position(|(k, _)| same_key(k, &key)) {
                    Some(i) => {
                        self.dead.push(std::mem::replace(&mut d[i].1, value));
                        self.dead.push(key);
                    }
                    None => d.push((key, value)),
                }
            }
            return Ok(());
        }
        let (_, index) = self.keys.entry(id).or_insert_with(|| {
            let index = d
                .borrow()
                .iter()
                .enumerate()
                .filter_map(|(i, (k, _))| Some((dict_key(k)?, i)))
                .collect();
            (target.clone(), index)
        });
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(key), Some(value)) = (it.next(), it.next()) {
            // A repeated key replaces the earlier value, as in a Python dict (compared as text).
            match dict_key(&key).and_then(|k| index.get(&k).copied()) {
                Some(i) => {
                    self.dead.push(std::mem::replace(&mut d[i].1, value));
                    self.dead.push(key);
                }
                None => {
                    if let Some(k) = dict_key(&key) {
                        index.insert(k, d.len());
                    }
                    d.push((key, value));
                }
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Value, String> {
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
                b'('
                | b')'
                | b't'
                | 0x85..=0x87
                | b']'
                | b'l'
                | b'a'
                | b'e'
                | b'}'
                | b'd'
                | b's'
                | b'u' => self.container_op(op)?,
                b'N' | 0x88 | 0x89 | b'J' | b'K' | b'M' | 0x8a | 0x8b | b'G' => {
                    self.number_op(op)?
                }
                0x8c | b'X' | 0x8d | b'C' | b'B' | 0x8e | b'U' | b'T' => self.text_op(op)?,
                0x94 | b'q' | b'r' | b'h' | b'j' => self.memo_op(op)?,
                b'c' | 0x93 | b'R' | 0x81 | b'b' | b'Q' => self.object_op(op)?,
                other => return Err(self.unsupported(other)),
            }
        }
    }

    fn unsupported(&self, op: u8) -> String {
        format!(
            "unsupported pickle opcode 0x{op:02x} at offset {}",
            self.pos - 1
        )
    }

    /// Tuples, lists and dicts: MARK, the tuple, list and dict opcodes, APPEND(S), SETITEM(S).
    fn container_op(&mut self, op: u8) -> Result<(), String> {
        match op {
            b'(' => self.marks.push(self.stack.len()),
            b')' => self.stack.push(Value::Tuple(Rc::new(vec![]))),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err("pickle stack underflow".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(Rc::new(items)));
            }
            b']' => self.stack.push(Value::List(Rc::new(RefCell::new(vec![])))),
            b'l' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::List(Rc::new(RefCell::new(items))));
            }
            // Nothing popped is dropped here: a refused value goes to `dead`.
            b'a' => {
                let v = self.pop()?;
                match self.stack.last() {
                    Some(Value::List(l)) => l.borrow_mut().push(v),
                    _ => {
                        self.dead.push(v);
                        return Err("APPEND to a value that is not a list".into());
                    }
                }
            }
            b'e' => {
                let items = self.pop_mark()?;
                match self.stack.last() {
                    Some(Value::List(l)) => l.borrow_mut().extend(items),
                    _ => {
                        self.dead.extend(items);
                        return Err("APPENDS to a value that is not a list".into());
                    }
                }
            }
            b'}' => self.stack.push(Value::Dict(Rc::new(RefCell::new(vec![])))),
            b'd' => {
                let items = self.pop_mark()?;
                let d = Value::Dict(Rc::new(RefCell::new(vec![])));
                self.set_items(&d, items)?;
                self.stack.push(d);
            }
            b's' => {
                if self.stack.len() < 3 {
                    return Err("pickle stack underflow".into());
                }
                let items = self.stack.split_off(self.stack.len() - 2);
                let target = self.top()?.clone();
                self.set_items(&target, items)?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let Some(target) = self.stack.last().cloned() else {
                    self.dead.extend(items);
                    return Err("pickle stack underflow".into());
                };
                self.set_items(&target, items)?;
            }
            _ => return Err(self.unsupported(op)),
        }
        Ok(())
    }

    /// None, booleans, integers and floats.
    fn number_op(&mut self, op: u8) -> Result<(), String> {
        match op {
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
            _ => return Err(self.unsupported(op)),
        }
        Ok(())
    }

    /// Strings and bytes.
    fn text_op(&mut self, op: u8) -> Result<(), String> {
        match op {
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
            _ => return Err(self.unsupported(op)),
        }
        Ok(())
    }

    /// The memo: MEMOIZE, (BIN|LONG_BIN)PUT, (BIN|LONG_BIN)GET.
    fn memo_op(&mut self, op: u8) -> Result<(), String> {
        match op {
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
            _ => return Err(self.unsupported(op)),
        }
        Ok(())
    }

    /// Classes and objects: GLOBAL, STACK_GLOBAL, REDUCE, NEWOBJ, BUILD, BINPERSID.
    fn object_op(&mut self, op: u8) -> Result<(), String> {
        match op {
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
                if self.stack.len() < 2 {
                    return Err("pickle stack underflow".into());
                }
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.global(m, n)?,
                    (m, n) => {
                        self.dead.extend([m, n]);
                        return Err("STACK_GLOBAL without two strings".into());
                    }
                }
            }
            b'R' | 0x81 => {
                if self.stack.len() < 2 {
                    return Err("pickle stack underflow".into());
                }
                let what = if op == b'R' { "REDUCE" } else { "NEWOBJ" };
                let args = self.pop()?;
                let callable = self.pop()?;
                let items = args.items();
                self.dead.extend([args]);
                let Some(items) = items else {
                    self.dead.push(callable);
                    return Err(format!("{what} arguments are not a tuple"));
                };
                self.copied = self.copied.saturating_add(items.len());
                if self.copied > self.data.len() {
                    self.dead.push(callable);
                    self.dead.extend(items);
                    return Err(format!(
                        "{what} arguments copied more often than the pickle is long: refusing a pickle that expands itself"
                    ));
                }
                self.instantiate(callable, items)?;
            }
            b'b' => {
                let state = self.pop()?;
                match self.stack.last() {
                    Some(Value::Object(o)) => {
                        let old = o.borrow_mut().state.replace(state);
                        self.dead.extend(old);
                    }
                    _ => {
                        self.dead.push(state);
                        return Err("BUILD on a value that is not an object".into());
                    }
                }
            }
            b'Q' => {
                // torch's persistent ids are tuples (`('storage', cls, key, location, n)`);
                // anything else (a persistent id of a persistent id ...) is refused.
                let pid = self.pop()?;
                if !matches!(pid, Value::Tuple(_)) {
                    self.dead.push(pid);
                    return Err("a persistent id that is not a tuple".into());
                }
                self.stack.push(Value::Persistent(Box::new(pid)));
            }
            _ => return Err(self.unsupported(op)),
        }
        Ok(())
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

    /// Hostile pickles: refused (or read) with an error, never a stack overflow, an
    /// exponential blow-up or a huge allocation.
    #[test]
    fn hostile_pickles_are_refused_not_crashed_on() {
        const N: usize = 200_000;
        // ((((...)))) 200 000 deep, one byte a level: too deep.
        let mut p = vec![0x80, 0x02, b')'];
        p.extend(std::iter::repeat_n(0x85, N));
        p.push(b'.');
        let e = load(&p, "t").unwrap_err();
        assert!(e.contains("more than 512 deep"), "{e}");
        // The same left on the stack under a harmless result: let go without recursion.
        p.pop();
        p.extend_from_slice(b"N.");
        assert!(matches!(load(&p, "t").unwrap(), Value::None));
        // ... or under an error.
        p.truncate(p.len() - 2);
        p.push(0xff);
        assert!(load(&p, "t")
            .unwrap_err()
            .contains("unsupported pickle opcode"));
        // Lists nested by APPEND, and a dict holding a deep value under a key replaced later.
        let mut p = vec![0x80, 0x02];
        p.extend(std::iter::repeat_n(b']', N));
        p.extend(std::iter::repeat_n(b'a', N - 1));
        p.push(b'.');
        assert!(load(&p, "t").unwrap_err().contains("deep"));
        let mut p = vec![0x80, 0x02, b'}', b'K', 1, b')'];
        p.extend(std::iter::repeat_n(0x85, N));
        p.extend_from_slice(&[b's', b'K', 1, b'N', b's', b'.']);
        let d = load(&p, "t").unwrap().dict_entries().unwrap();
        assert!(matches!(d.as_slice(), [(Value::Int(1), Value::None)]));
        // A list inside itself.
        let p = [0x80, 0x02, b']', b'q', 0, b'h', 0, b'a', b'.'];
        assert!(load(&p, "t").unwrap_err().contains("cycle"));
        // A memo index of 2^32 - 1: one entry, not a table of 4 billion.
        let p = [
            0x80, 0x02, b'N', b'r', 0xff, 0xff, 0xff, 0xff, b'j', 0xff, 0xff, 0xff, 0xff, 0x86,
            b'.',
        ];
        assert_eq!(load(&p, "t").unwrap().items().unwrap().len(), 2);
        // t(i+1) = (t(i), t(i)) 64 times: 2^64 leaves if copied, 64 shared tuples here.
        let mut p = vec![0x80, 0x02, b')', b'q', 0];
        for i in 0..64u8 {
            p.extend_from_slice(&[b'h', i, b'h', i, 0x86, b'q', i + 1]);
        }
        p.push(b'.');
        assert_eq!(load(&p, "t").unwrap().items().unwrap().len(), 2);
        // A 1000-item argument tuple passed to REDUCE 10 000 times: refused, not 10^7 copies.
        let mut p = vec![0x80, 0x02];
        p.extend_from_slice(b"ccollections\nOrderedDict\nq\x00(");
        p.extend(std::iter::repeat_n(b'N', 1000));
        p.extend_from_slice(&[b't', b'q', 1]);
        for _ in 0..10_000 {
            p.extend_from_slice(&[b'h', 0, b'h', 1, b'R']);
        }
        p.push(b'.');
        assert!(load(&p, "t").unwrap_err().contains("expands itself"));
        // A persistent id of a persistent id.
        let p = [0x80, 0x02, b')', b'Q', b'Q', b'.'];
        assert!(load(&p, "t").unwrap_err().contains("persistent id"));
        // A huge length: refused before anything is allocated.
        let mut p = vec![0x80, 0x04, 0x8d];
        p.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(load(&p, "t").unwrap_err().contains("truncated"));
        // A dict of many keys, one repeated: built in linear time, the last value kept.
        let mut p = vec![0x80, 0x02, b'}', b'('];
        for i in 0..100_000u32 {
            p.push(b'J');
            p.extend_from_slice(&i.to_le_bytes());
            p.push(b'N');
        }
        p.extend_from_slice(&[b'K', 7, 0x88, b'u', b'.']);
        let d = load(&p, "t").unwrap().dict_entries().unwrap();
        assert_eq!(d.len(), 100_000);
        assert!(matches!(d[7], (Value::Int(7), Value::Bool(true))));
    }

    #[test]
    fn truncated_is_an_error() {
        assert!(load(&[0x80, 0x02, 0x8c, 10, b'a'], "t")
            .unwrap_err()
            .contains("truncated"));
    }
}
