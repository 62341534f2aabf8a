//! The network options DRBD is running with, from `drbdsetup show --show-defaults RESOURCE`.
//!
//! `drbdsetup status` does not report the protocol or `allow-two-primaries`, so the only
//! way to see whether a `net-options` change took is `drbdsetup show`, which prints the
//! running configuration in drbd.conf syntax. Its `--json` form is not used: up to
//! drbd-utils 9.32 it prints only the first option of each section and leaves the JSON
//! unterminated (fixed in 9.33 by "fix show --json formatting"), and Debian ships 9.22.
//!
//! The text looks like this (`--show-defaults` makes it print options left at their
//! default, marked `# default`):
//!
//! ```text
//! resource "web1" {
//!     _this_host {
//!         node-id                 0;
//!         ...
//!     }
//!     connection {
//!         _peer_node_id 1;
//!         path { _this_host ipv4 10.0.0.1:7790; _remote_host ipv4 10.1.0.1:7790; }
//!         net {
//!             protocol            C; # default
//!             allow-two-primaries no; # default
//!             _name               "dallas-3";
//!         }
//!     }
//! }
//! ```

/// The options of one connection that the steering changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// `A`, `B` or `C`.
    pub protocol: String,
    /// Whether both nodes may be Primary at once.
    pub allow_two_primaries: bool,
}

/// A statement: words, then either `;` or a `{ block }`.
#[derive(Debug)]
struct Stmt {
    words: Vec<String>,
    block: Option<Vec<Stmt>>,
}

/// Reads the options of `resource`'s connection to `peer` from `drbdsetup show` output.
/// Options absent from the text have DRBD's defaults (protocol C, one primary), which is
/// what drbdsetup means by leaving them out.
pub fn parse_net_options(text: &str, resource: &str, peer: u8) -> Result<NetOptions, String> {
    let stmts = parse(text)?;
    let res = stmts
        .iter()
        .find(|s| s.words.len() == 2 && s.words[0] == "resource" && s.words[1] == resource)
        .and_then(|s| s.block.as_ref())
        .ok_or_else(|| format!("drbdsetup shows no resource {resource:?}; is it up?"))?;
    let peer_id = peer.to_string();
    let conn = res
        .iter()
        .filter(|s| s.words == ["connection"])
        .filter_map(|s| s.block.as_ref())
        .find(|b| {
            b.iter().any(|s| {
                s.words.len() == 2 && s.words[0] == "_peer_node_id" && s.words[1] == peer_id
            })
        })
        .ok_or_else(|| format!("drbdsetup shows no connection to node {peer} in {resource:?}"))?;
    let mut opts = NetOptions {
        protocol: "C".into(),
        allow_two_primaries: false,
    };
    for net in conn
        .iter()
        .filter(|s| s.words == ["net"])
        .filter_map(|s| s.block.as_ref())
    {
        for s in net {
            match s.words.as_slice() {
                [k, v] if k == "protocol" => opts.protocol = v.clone(),
                [k, v] if k == "allow-two-primaries" => {
                    opts.allow_two_primaries = match v.as_str() {
                        "yes" => true,
                        "no" => false,
                        other => return Err(format!("allow-two-primaries is {other:?}")),
                    }
                }
                _ => {}
            }
        }
    }
    Ok(opts)
}

fn parse(text: &str) -> Result<Vec<Stmt>, String> {
    let tokens = tokenize(text)?;
    let mut pos = 0;
    block(&tokens, &mut pos, false)
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Open,
    Close,
    Semi,
}

/// Statements up to the `}` that closes a `nested` block, or to the end of the text.
fn block(tokens: &[Token], pos: &mut usize, nested: bool) -> Result<Vec<Stmt>, String> {
    let mut stmts = Vec::new();
    let mut words = Vec::new();
    let mut closed = false;
    while let Some(t) = tokens.get(*pos) {
        *pos += 1;
        match t {
            Token::Word(w) => words.push(w.clone()),
            Token::Semi => stmts.push(Stmt {
                words: std::mem::take(&mut words),
                block: None,
            }),
            Token::Open => {
                let inner = block(tokens, pos, true)?;
                stmts.push(Stmt {
                    words: std::mem::take(&mut words),
                    block: Some(inner),
                });
            }
            Token::Close if !nested => {
                return Err("unbalanced '}' in drbdsetup show output".into());
            }
            Token::Close => {
                closed = true;
                break;
            }
        }
    }
    if !words.is_empty() {
        return Err(format!("{:?} is missing its ';'", words.join(" ")));
    }
    if nested && !closed {
        return Err("unterminated '{' in drbdsetup show output".into());
    }
    Ok(stmts)
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '{' => out.push(Token::Open),
            '}' => out.push(Token::Close),
            ';' => out.push(Token::Semi),
            '"' => {
                let mut w = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => w.extend(chars.next()),
                        Some(c) => w.push(c),
                        None => return Err("unterminated string in drbdsetup show output".into()),
                    }
                }
                out.push(Token::Word(w));
            }
            c if c.is_whitespace() => {}
            c => {
                let mut w = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || matches!(n, '{' | '}' | ';' | '"' | '#') {
                        break;
                    }
                    w.push(n);
                    chars.next();
                }
                out.push(Token::Word(w));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// drbdsetup 9.22's `show --show-defaults` layout (its printI formats), trimmed.
    const SHOW: &str = "resource \"web1\" {
    options {
        cpu-mask        \t\"\"; # default
        on-no-data-accessible\tio-error; # default
    }
    _this_host {
        node-id\t\t\t0;
        volume 0 {
            device\t\t\tminor 10;
            disk\t\t\t\"/dev/vg0/web1\";
            meta-disk\t\t\tinternal;
        }
    }
    connection {
        _peer_node_id 1;
        path {
            _this_host ipv4 10.0.0.1:7790;
            _remote_host ipv4 10.1.0.1:7790;
        }
        net {
            transport       \t\"\"; # default
            protocol        \tA;
            timeout         \t60; # 1/10 seconds, default
            allow-two-primaries\tno; # default
            _name           \t\"dallas-3\";
        }
    }
}

";

    #[test]
    fn reads_protocol_and_two_primaries() {
        assert_eq!(
            parse_net_options(SHOW, "web1", 1),
            Ok(NetOptions {
                protocol: "A".into(),
                allow_two_primaries: false
            })
        );
        let c = SHOW.replace("\tA;", "\tC;").replace(
            "allow-two-primaries\tno; # default",
            "allow-two-primaries\tyes;",
        );
        assert_eq!(
            parse_net_options(&c, "web1", 1),
            Ok(NetOptions {
                protocol: "C".into(),
                allow_two_primaries: true
            })
        );
    }

    #[test]
    fn options_left_out_are_drbds_defaults() {
        let bare = "resource \"web1\" {\n connection {\n _peer_node_id 1;\n net {\n \
                    _name \"x\";\n }\n }\n}\n";
        let o = parse_net_options(bare, "web1", 1).unwrap();
        assert_eq!((o.protocol.as_str(), o.allow_two_primaries), ("C", false));
    }

    #[test]
    fn wrong_resource_peer_or_syntax_is_an_error() {
        assert!(
            parse_net_options(SHOW, "db2", 1)
                .unwrap_err()
                .contains("no resource")
        );
        assert!(
            parse_net_options(SHOW, "web1", 2)
                .unwrap_err()
                .contains("no connection")
        );
        assert!(parse_net_options("# No currently configured DRBD found.\n", "web1", 1).is_err());
        assert!(parse_net_options("resource \"web1\" {", "web1", 1).is_err());
        assert!(parse_net_options("resource \"web1\" { a { }", "web1", 1).is_err());
        assert!(parse_net_options("resource \"web1\" { x }", "web1", 1).is_err());
        assert!(parse_net_options("resource \"web1\" }", "web1", 1).is_err());
        let odd = SHOW.replace("allow-two-primaries\tno", "allow-two-primaries\tmaybe");
        assert!(
            parse_net_options(&odd, "web1", 1)
                .unwrap_err()
                .contains("maybe")
        );
    }
}
