//! Lines to stdout and stderr, formatted without an allocator.

use crate::sys;

/// A descriptor written through `core::fmt`, in pieces of up to 512 bytes.
pub struct Out {
    fd: i32,
    buf: [u8; 512],
    len: usize,
}

impl Out {
    pub fn stdout() -> Out {
        Out { fd: 1, buf: [0; 512], len: 0 }
    }

    pub fn stderr() -> Out {
        Out { fd: 2, buf: [0; 512], len: 0 }
    }

    pub fn flush(&mut self) {
        sys::write_all(self.fd, &self.buf[..self.len]);
        self.len = 0;
    }
}

impl core::fmt::Write for Out {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for chunk in s.as_bytes().chunks(self.buf.len()) {
            if self.len + chunk.len() > self.buf.len() {
                self.flush();
            }
            self.buf[self.len..self.len + chunk.len()].copy_from_slice(chunk);
            self.len += chunk.len();
        }
        Ok(())
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `writeln!` to stderr, prefixed with the program's name.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut o = $crate::out::Out::stderr();
        let _ = o.write_str("devloop-forward: ");
        let _ = writeln!(o, $($arg)*);
    }};
}
