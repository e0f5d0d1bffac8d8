//! devloop-forward: the intercept's forwarder.
//!
//! It listens where the intercepted traffic arrives (the port the Service
//! points at while an intercept is set up) and hands each connection on:
//! to devloop's agent, on its claim port on loopback, while the agent
//! holds the intercept (it listens there only while a devloop is connected
//! to it, within the lease); else to the app's own port. So when devloop
//! goes away, by any means, new connections reach the app at once, and a
//! pod started while devloop is away (it has the forwarder from its
//! template) serves the app as before.
//!
//! No std and no libc (raw Linux x86_64 system calls): the binary is a few
//! kilobytes, travels into pods in a ConfigMap and runs in the app's own
//! image, whatever else that image holds or lacks.
#![no_std]
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

#[cfg(test)]
extern crate std;

pub mod out;
pub mod relay;
pub mod route;
pub mod sys;
