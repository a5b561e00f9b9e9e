//! `mcp-warden check FILE...`
use std::path::PathBuf;

use super::parse::parse;
use super::vars::Vars;

/// Validate every file; print each diagnostic to stderr as
/// `file:line:col: message` and `FILE: ok` (stdout) for each good file.
/// Returns 0 if all are good, 1 if any is invalid, 2 if any cannot be read
/// (or the caller's account cannot be looked up for `${HOME}` & co).
pub fn check_main(paths: &[PathBuf]) -> i32 {
    let uid = nix::unistd::getuid().as_raw();
    let vars = match Vars::for_uid(uid) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("mcp-warden check: {e}");
            return 2;
        }
    };
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    check_with(paths, &vars, &mut out, &mut err)
}

/// [`check_main`] with the variables and the output streams given.
pub fn check_with(
    paths: &[PathBuf],
    vars: &Vars,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> i32 {
    let mut rc = 0;
    for p in paths {
        let name = p.display().to_string();
        let text = match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => {
                let _ = writeln!(err, "{name}: cannot read: {e}");
                rc = 2;
                continue;
            }
        };
        match parse(&text, &name, vars) {
            Ok(_) => {
                let _ = writeln!(out, "{name}: ok");
            }
            Err(diags) => {
                for d in diags {
                    let _ = writeln!(err, "{d}");
                }
                if rc == 0 {
                    rc = 1;
                }
            }
        }
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_output() {
        let dir = std::env::temp_dir().join(format!("mw-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        let bad = dir.join("bad.toml");
        std::fs::write(&good, "version = 1\nserver = \"x\"\n").unwrap();
        std::fs::write(&bad, "version = 2\nserver = \"x\"\nmode = \"x\"\n").unwrap();
        let vars = Vars {
            home: "/home/a".into(),
            user: "a".into(),
            uid: 1,
        };
        let (mut o, mut e) = (Vec::new(), Vec::new());
        assert_eq!(
            check_with(std::slice::from_ref(&good), &vars, &mut o, &mut e),
            0
        );
        assert_eq!(
            String::from_utf8(o).unwrap(),
            format!("{}: ok\n", good.display())
        );
        let (mut o, mut e) = (Vec::new(), Vec::new());
        assert_eq!(
            check_with(&[good.clone(), bad.clone()], &vars, &mut o, &mut e),
            1
        );
        let e = String::from_utf8(e).unwrap();
        let b = bad.display();
        assert_eq!(
            e,
            format!(
                "{b}:1:11: unsupported version 2: this mcp-warden reads version 1\n\
                 {b}:3:8: bad mode `x`: expected \"enforce\" or \"audit\"\n"
            )
        );
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let missing = dir.join("missing.toml");
        assert_eq!(check_with(&[bad, missing, good], &vars, &mut o, &mut e), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
