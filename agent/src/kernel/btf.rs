//! Struct layouts from the running kernel's BTF (/sys/kernel/btf/vmlinux).
//!
//! aya programs carry no CO-RE relocations, so every kernel struct offset a
//! program uses is read here at load time and handed to the program as a
//! global. A layout that cannot be read is an error: the hook that needs it
//! is not enabled (and says so), never run with a guessed offset.
//!
//! This reads just enough of the BTF format (linux/btf.h) to find a named
//! struct and the byte offsets of its members, descending through
//! anonymous struct/union members as C does.
use std::{collections::HashMap, path::Path};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF kind {0} is unknown to this reader")]
    UnknownKind(u32),
    #[error("struct {0} not found in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("{strukt}.{member} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset.
    bits: u32,
    bitfield: bool,
}

#[derive(Clone, Debug)]
enum Type {
    Struct {
        name: u32,
        size: u32,
        members: Vec<Member>,
    },
    /// Typedef, const, volatile, restrict, type tag: refers to `ty`.
    Alias(u32),
    Func {
        name: u32,
    },
    Other,
}

/// The parsed type table.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    /// Struct name -> type ids (the first complete one is used).
    structs: HashMap<String, Vec<u32>>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.types.len())
            .finish()
    }
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, BtfError> {
    b.get(off..off + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parse a BTF blob in host byte order (vmlinux BTF always is).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if u16_at(data, 0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (or foreign byte order)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let tbase = hdr_len + type_off;
        let sbase = hdr_len + str_off;
        let tsec = data
            .get(tbase..tbase + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(sbase..sbase + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        // Type id 0 is `void`.
        let mut types = vec![Type::Other];
        let mut off = 0;
        while off < tsec.len() {
            let name = u32_at(tsec, off)?;
            let info = u32_at(tsec, off + 4)?;
            let size_or_type = u32_at(tsec, off + 8)?;
            off += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kflag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = off + 12 * i;
                        let raw = u32_at(tsec, m + 8)?;
                        let (bits, bitfield) = if kflag {
                            (raw & 0x00ff_ffff, raw >> 24 != 0)
                        } else {
                            (raw, false)
                        };
                        members.push(Member {
                            name: u32_at(tsec, m)?,
                            ty: u32_at(tsec, m + 4)?,
                            bits,
                            bitfield,
                        });
                    }
                    off += 12 * vlen;
                    Type::Struct {
                        name,
                        size: size_or_type,
                        members,
                    }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias(size_or_type)
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    off += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    off += 12;
                    Type::Other
                }
                KIND_ENUM | KIND_FUNC_PROTO => {
                    off += 8 * vlen;
                    Type::Other
                }
                KIND_DATASEC | KIND_ENUM64 => {
                    off += 12 * vlen;
                    Type::Other
                }
                KIND_FUNC => Type::Func { name },
                KIND_PTR | KIND_FWD | KIND_FLOAT => Type::Other,
                k => return Err(BtfError::UnknownKind(k)),
            };
            types.push(ty);
        }
        if off != tsec.len() {
            return Err(BtfError::Malformed("type section length"));
        }
        let mut btf = Self {
            types,
            strings,
            structs: HashMap::new(),
        };
        let mut structs: HashMap<String, Vec<u32>> = HashMap::new();
        for (id, t) in btf.types.iter().enumerate() {
            if let Type::Struct { name, .. } = t {
                if *name != 0 {
                    structs
                        .entry(btf.string(*name).to_string())
                        .or_default()
                        .push(id as u32);
                }
            }
        }
        btf.structs = structs;
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Follow typedefs and qualifiers to the type they name.
    fn strip(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(Type::Alias(next)) => id = *next,
                _ => break,
            }
        }
        id
    }

    /// Type id of the function `name` (an LSM hook's attach point).
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.types.iter().enumerate().find_map(|(id, t)| match t {
            Type::Func { name: n } if self.string(*n) == name => Some(id as u32),
            _ => None,
        })
    }

    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.structs
            .get(name)
            .and_then(|ids| ids.first().copied())
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))
    }

    /// Size in bytes of struct `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        match self.types.get(self.struct_id(name)? as usize) {
            Some(Type::Struct { size, .. }) => Ok(*size),
            _ => Err(BtfError::NoStruct(name.to_string())),
        }
    }

    /// Byte offset of `member` in struct `strukt`, looking inside anonymous
    /// struct and union members too.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = self.struct_id(strukt)?;
        match self.find_member(id, member, 0) {
            Some((_, bitfield)) if bitfield => Err(BtfError::Bitfield {
                strukt: strukt.into(),
                member: member.into(),
            }),
            Some((bits, _)) if bits.is_multiple_of(8) => Ok(bits / 8),
            Some(_) => Err(BtfError::Bitfield {
                strukt: strukt.into(),
                member: member.into(),
            }),
            None => Err(BtfError::NoMember {
                strukt: strukt.into(),
                member: member.into(),
            }),
        }
    }

    /// (bit offset, is a bitfield) of `member` under type `id`.
    fn find_member(&self, id: u32, member: &str, depth: u32) -> Option<(u32, bool)> {
        if depth > 8 {
            return None;
        }
        let Some(Type::Struct { members, .. }) = self.types.get(id as usize) else {
            return None;
        };
        for m in members {
            if m.name != 0 && self.string(m.name) == member {
                return Some((m.bits, m.bitfield));
            }
        }
        for m in members.iter().filter(|m| m.name == 0) {
            if let Some((bits, bf)) = self.find_member(self.strip(m.ty), member, depth + 1) {
                return Some((m.bits + bits, bf));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: struct s { int a; union { long b; int c; }; int d:3; }
    fn blob() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0c\0d\0int\0long\0".to_vec();
        let s = |n: &str| -> u32 {
            let needle = format!("\0{n}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .unwrap()
        };
        let mut t: Vec<u32> = Vec::new();
        // 1: int
        t.extend([s("int"), KIND_INT << 24, 4, 32]);
        // 2: long
        t.extend([s("long"), KIND_INT << 24, 8, 64]);
        // 3: anonymous union { long b; int c; }
        t.extend([0, KIND_UNION << 24 | 2, 8]);
        t.extend([s("b"), 2, 0, s("c"), 1, 0]);
        // 4: const union
        t.extend([0, KIND_CONST << 24, 3]);
        // 5: struct s (kind_flag: bitfield sizes in the offset)
        t.extend([s("s"), 1 << 31 | KIND_STRUCT << 24 | 3, 24]);
        t.extend([s("a"), 1, 0, 0, 4, 64, s("d"), 1, 3 << 24 | 128]);
        let types: Vec<u8> = t.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_ne_bytes());
        out.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(v.to_ne_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn members_and_anonymous_unions() {
        let b = Btf::parse(&blob()).unwrap();
        assert_eq!(b.struct_size("s").unwrap(), 24);
        assert_eq!(b.member_offset("s", "a").unwrap(), 0);
        assert_eq!(b.member_offset("s", "b").unwrap(), 8);
        assert_eq!(b.member_offset("s", "c").unwrap(), 8);
        assert!(matches!(
            b.member_offset("s", "d"),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(
            b.member_offset("s", "e"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            b.member_offset("t", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }

    /// The running kernel's BTF parses and has the structs the programs use.
    #[test]
    fn running_kernel() {
        if !Path::new(VMLINUX).exists() {
            return;
        }
        let b = Btf::from_sys_fs().unwrap();
        assert_eq!(b.member_offset("bpf_sock_addr_kern", "sk").unwrap(), 0);
        assert!(b.member_offset("bpf_sock_addr_kern", "uaddr").unwrap() > 0);
        assert!(b.member_offset("file", "f_path").unwrap() > 0);
    }
}
