//! `Caller`: the Unix identity an object was submitted with — an API client as the kernel
//! reports it on the socket (`SO_PEERCRED`), or the owner of the spec directory — recorded on
//! every stored object, shown as the audit log's actor, and the rights a run's host inputs are
//! read with (`agentvm_run::host_access`).
//!
//! # Guarantees
//! - The uid and primary gid of an API client come from the kernel (the socket's peer
//!   credentials), never from the request.
//! - Supplementary groups come from the client process's `/proc/<pid>/status`, read when
//!   the connection is accepted, and only when that entry still belongs to the same
//!   effective uid; otherwise the caller has none (fewer rights, never more).
//!
//! # Assumptions
//! - User and group names come from `/etc/passwd` and `/etc/group` (no NSS); a uid without
//!   an entry is shown as `uid=N`.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A Unix identity: user, primary group and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids, sorted, without duplicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
    /// The user's name in `/etc/passwd` when it was recorded, for messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl fmt::Display for Caller {
    /// `uid=1000(alice)`, or `uid=1000` for a uid without a name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.user {
            Some(name) => write!(f, "uid={}({name})", self.uid),
            None => write!(f, "uid={}", self.uid),
        }
    }
}

impl Caller {
    /// root (uid 0, gid 0).
    pub fn root() -> Self {
        Caller {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            user: Some("root".into()),
        }
    }

    /// True for uid 0.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// An API client with the peer credentials `uid`, `gid` and `pid` of its connection; its
    /// supplementary groups are read from `/proc/<pid>/status` (none when that process is
    /// gone or now belongs to someone else).
    pub fn from_peer(uid: u32, gid: u32, pid: Option<i32>) -> Self {
        let groups = pid
            .filter(|p| *p > 0)
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .and_then(|status| groups_of_process(&status, uid))
            .unwrap_or_default();
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        Caller {
            uid,
            gid,
            groups: normalized(groups),
            user: passwd_entry(&passwd, uid).map(|(name, _)| name),
        }
    }

    /// The owner of `path` (the spec directory): its uid, that user's primary group from
    /// `/etc/passwd` (the file's group when the user has no entry) and the groups
    /// `/etc/group` lists the user in.
    pub fn owner_of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        Ok(owner_from(meta.uid(), meta.gid(), &passwd, &groups))
    }
}

/// [`Caller::owner_of`] on the given `/etc/passwd` and `/etc/group` texts.
fn owner_from(uid: u32, file_gid: u32, passwd: &str, groups: &str) -> Caller {
    match passwd_entry(passwd, uid) {
        Some((name, gid)) => Caller {
            uid,
            gid,
            groups: normalized(member_of(groups, &name)),
            user: Some(name),
        },
        None => Caller {
            uid,
            gid: file_gid,
            groups: Vec::new(),
            user: None,
        },
    }
}

fn normalized(mut groups: Vec<u32>) -> Vec<u32> {
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// The `Groups:` of a `/proc/<pid>/status` text whose effective uid is `uid`; `None` when
/// the uid differs (the pid was reused) or the text has no such lines.
fn groups_of_process(status: &str, uid: u32) -> Option<Vec<u32>> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    // Real, effective, saved, filesystem.
    let effective: u32 = field("Uid:")?.split_whitespace().nth(1)?.parse().ok()?;
    if effective != uid {
        return None;
    }
    field("Groups:")?
        .split_whitespace()
        .map(|g| g.parse().ok())
        .collect()
}

/// Name and primary gid of `uid` in the `/etc/passwd` text `passwd`.
fn passwd_entry(passwd: &str, uid: u32) -> Option<(String, u32)> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[2].parse() == Ok(uid))
            .then(|| Some((f[0].to_string(), f[3].parse().ok()?)))
            .flatten()
    })
}

/// The gids of the groups whose member list in the `/etc/group` text `groups` names `user`.
fn member_of(groups: &str, user: &str) -> Vec<u32> {
    groups
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 4 && f[3].split(',').any(|m| m.trim() == user))
                .then(|| f[2].parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbroken:x:x\n";
    const GROUP: &str =
        "root:x:0:\nalice:x:1000:\nagentvm:x:998:bob,alice\ndev:x:1500:alice\nother:x:1600:bob\n";

    #[test]
    fn shown_as_uid_and_name() {
        assert_eq!(Caller::root().to_string(), "uid=0(root)");
        let c = Caller {
            uid: 4242,
            gid: 4242,
            groups: vec![],
            user: None,
        };
        assert_eq!(c.to_string(), "uid=4242");
        assert!(!c.is_root());
    }

    #[test]
    fn process_groups_only_for_the_same_user() {
        let status = "Name:\tagentvm\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t998 1500 \n";
        assert_eq!(groups_of_process(status, 1000), Some(vec![998, 1500]));
        // The pid now belongs to someone else: no groups from it.
        assert_eq!(groups_of_process(status, 1001), None);
        let none = "Uid:\t0\t0\t0\t0\nGroups:\t\n";
        assert_eq!(groups_of_process(none, 0), Some(vec![]));
        assert_eq!(groups_of_process("Uid:\t0\t0\t0\t0\n", 0), None);
    }

    #[test]
    fn spec_dir_owner_from_passwd_and_group() {
        let alice = owner_from(1000, 7, PASSWD, GROUP);
        assert_eq!(
            alice,
            Caller {
                uid: 1000,
                gid: 1000,
                groups: vec![998, 1500],
                user: Some("alice".into()),
            }
        );
        assert_eq!(alice.to_string(), "uid=1000(alice)");
        // No passwd entry: the file's group, no supplementary groups.
        let unknown = owner_from(3000, 7, PASSWD, GROUP);
        assert_eq!((unknown.gid, unknown.groups.len()), (7, 0));
        assert_eq!(owner_from(0, 0, PASSWD, GROUP), Caller::root());
    }

    #[test]
    fn this_process_as_a_peer() {
        let me = std::fs::metadata("/proc/self").unwrap();
        let c = Caller::from_peer(me.uid(), me.gid(), Some(std::process::id() as i32));
        assert_eq!(c.uid, me.uid());
        // A pid that cannot exist: no groups, still an identity.
        let c = Caller::from_peer(me.uid(), me.gid(), Some(i32::MAX));
        assert!(c.groups.is_empty());
    }
}
