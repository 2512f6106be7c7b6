//! Users and groups of this machine, by name or number: whom a mount
//! presents its files as (`--uid postgres`), and which OS user a service
//! started on a mount runs as.

use std::ffi::{CStr, CString};
use std::path::PathBuf;

/// One entry of the user database (`getpwnam`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home folder.
    pub home: PathBuf,
}

/// Reads one `passwd` entry with a `getpw*_r` call, growing the buffer as asked.
fn passwd_entry(
    call: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> libc::c_int,
) -> Option<User> {
    let mut size = 1024usize;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: a zeroed passwd is a valid out parameter for getpw*_r.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: on success pw_name and pw_dir point into `buf`, NUL-terminated.
        let (name, home) = unsafe {
            (
                CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned(),
                CStr::from_ptr(pwd.pw_dir).to_string_lossy().into_owned(),
            )
        };
        return Some(User {
            name,
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home: PathBuf::from(home),
        });
    }
}

/// The user called `name`, if this machine has one.
pub fn user_named(name: &str) -> Option<User> {
    let c = CString::new(name).ok()?;
    passwd_entry(|pwd, buf, len, result| {
        // SAFETY: every pointer is valid for the call; `buf` has `len` bytes.
        unsafe { libc::getpwnam_r(c.as_ptr(), pwd, buf, len, result) }
    })
}

/// The user with id `uid`, if this machine has one.
pub fn user_with_id(uid: u32) -> Option<User> {
    passwd_entry(|pwd, buf, len, result| {
        // SAFETY: every pointer is valid for the call; `buf` has `len` bytes.
        unsafe { libc::getpwuid_r(uid, pwd, buf, len, result) }
    })
}

/// The id of group `name`, if this machine has one.
pub fn group_named(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let mut size = 1024usize;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: a zeroed group is a valid out parameter for getgrnam_r.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` has `size` bytes.
        let rc =
            unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), size, &mut result) };
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        return Some(grp.gr_gid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_by_name_and_id() {
        let root = user_named("root").expect("root");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(user_with_id(0).expect("uid 0").name, "root");
        assert_eq!(group_named("root"), Some(0));
        assert!(user_named("no-such-user-revive").is_none());
    }
}
