//! A writer for the cpio "newc" format, the format the kernel unpacks an
//! initramfs from. Writing it here needs no root (device nodes are just
//! entries) and no cpio tool.

const DIR: u32 = 0o040_000;
const FILE: u32 = 0o100_000;
const CHAR_DEV: u32 = 0o020_000;

#[derive(Default)]
pub struct Archive {
    data: Vec<u8>,
    next_inode: u32,
}

impl Archive {
    pub fn dir(&mut self, path: &str) {
        self.entry(path, DIR | 0o755, 2, (0, 0), &[]);
    }

    pub fn file(&mut self, path: &str, mode: u32, contents: &[u8]) {
        self.entry(path, FILE | mode, 1, (0, 0), contents);
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.entry(path, CHAR_DEV | mode, 1, (major, minor), &[]);
    }

    /// The archive, closed with the trailer entry.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.data
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), contents: &[u8]) {
        self.next_inode += 1;
        let name = path.trim_start_matches('/');
        let size = u32::try_from(contents.len()).expect("initramfs entry over 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("path too long");
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name_size,
            0, // check
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(contents);
        self.pad();
    }

    /// Header+name and data are each padded to a multiple of 4 bytes.
    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_trailer_closes() {
        let mut a = Archive::default();
        a.dir("/bin");
        a.file("/init", 0o755, b"#!/bin/sh\n");
        a.char_device("/dev/console", 0o600, 5, 1);
        let bytes = a.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin\0"));
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.contains("TRAILER!!!\0"));
        // The console's rdev major/minor are fields 10 and 11.
        let console = text.find("dev/console").unwrap();
        let header = &text[console - 110..console];
        assert_eq!(&header[6 + 9 * 8..6 + 10 * 8], "00000005");
        assert_eq!(&header[6 + 10 * 8..6 + 11 * 8], "00000001");
    }
}
