//! Chat: a line-based room, in the spirit of the Twisted and tokio chat
//! examples and of IRC habits.
//!
//! The first line a client sends is its nickname: 1 to 32 letters, digits,
//! `_` or `-`, not already taken (else an error line and a new prompt).
//! After that, a line that is not a command goes to every other member as
//! `<nick> text`. Commands:
//!
//! | command | effect |
//! |---|---|
//! | `/nick NEW` | change nickname |
//! | `/who` | list members |
//! | `/me ACTION` | `* nick ACTION` to the others |
//! | `/msg NICK TEXT` | `*from* TEXT` to NICK only |
//! | `/quit [REASON]` | leave |
//! | `/help` | list commands |
//!
//! A line starting with `//` is sent as text with one `/` removed. Output
//! lines end in `\r\n`; input lines may end in `\n` or `\r\n`. An over-long
//! line or one that is not UTF-8 gets an error line and goes nowhere; the
//! sender stays.
//!
//! # What reaches other members' terminals
//!
//! Members read the room in terminals, and a terminal obeys control
//! characters: a bare carriage return moves back to the start of the line
//! (so `"\rbob: ..."` would overwrite the sender's own `<nick>` and seem to
//! come from bob), ESC starts a sequence that can clear the screen, move the
//! cursor or set the window title, and NUL, DEL and the C1 controls (U+0080
//! to U+009F, among them the single-character CSI) do their own tricks. So
//! before a line is looked at, every control character in it (Unicode
//! category Cc: U+0000 to U+001F, U+007F, U+0080 to U+009F) except TAB is
//! replaced by U+FFFD, the replacement character, one for one. That covers
//! every path a member's text takes to others: plain lines, `/me`, `/msg`,
//! the `/quit` reason and nicknames (which allow only ASCII letters, digits,
//! `_` and `-` anyway). TAB and every other valid UTF-8 character pass
//! unchanged. Replacing rather than dropping keeps the attempt visible.
//!
//! Bytes that are not UTF-8 are not repaired: such a line gets
//! `error: that line is not UTF-8; not sent` and goes to no one, so a C1
//! control cannot sneak in as a raw 8-bit byte either.
//!
//! A member that stops reading never slows the others: messages for it
//! queue in its own output buffer, and once that passes the hard cap (or
//! stays above the soft cap for the soft period) the member is evicted
//! with a last notice.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::codec::{Delimited, FrameError, Overlong, MAX_LINE};
use crate::framed::{FrameService, Framed};
use crate::service::{CloseReason, ConnId, Context};

/// Output caps for members (Redis's pub/sub client limits are the model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Evict at once past this many unsent bytes. Default 1 MiB.
    pub hard: usize,
    /// Evict when above this for `soft_for`. Default 256 KiB.
    pub soft: usize,
    /// Default 10 s.
    pub soft_for: Duration,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            hard: 1024 * 1024,
            soft: 256 * 1024,
            soft_for: Duration::from_secs(10),
        }
    }
}

/// The longest nickname.
pub const MAX_NICK: usize = 32;

const HELP: &str =
    "* commands: /nick NEW, /who, /me ACTION, /msg NICK TEXT, /quit [REASON], /help\r\n";
const PROMPT: &str = "nickname?\r\n";
const EVICTED: &[u8] = b"* you are not reading; disconnected\r\n";

struct Member {
    id: ConnId,
    /// When its pending output first went above the soft cap.
    over_soft_since: Option<Instant>,
}

/// The chat room. One value serves every connection, so the member list
/// is a plain field.
#[derive(Default)]
pub struct Chat {
    members: BTreeMap<String, Member>,
    caps: Caps,
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat")
            .field("members", &self.members.len())
            .field("caps", &self.caps)
            .finish()
    }
}

/// One connection's state.
#[derive(Debug, Default)]
pub struct Session {
    nick: Option<String>,
    quit: Option<String>,
}

impl Chat {
    /// An empty room with the default caps.
    pub fn new() -> Chat {
        Chat::default()
    }

    /// An empty room with other output caps.
    pub fn with_caps(caps: Caps) -> Chat {
        Chat {
            caps,
            ..Chat::default()
        }
    }

    /// The room framed by lines of at most [`MAX_LINE`] bytes; longer ones
    /// are skipped with an error line.
    pub fn service(self) -> Framed<Delimited, Chat> {
        Framed::new(Delimited::lines(MAX_LINE).overlong(Overlong::Skip), self)
    }

    /// Sends `line` (without its line end) to every member but `except`,
    /// evicting members that have fallen too far behind.
    fn tell_others(&mut self, cx: &mut Context<'_>, except: Option<ConnId>, line: &str) {
        let now = cx.now();
        for member in self.members.values_mut() {
            if Some(member.id) != except {
                deliver(cx, member, line.as_bytes(), &self.caps, now);
            }
        }
    }

    fn register(&mut self, cx: &mut Context<'_>, s: &mut Session, nick: &str) {
        if let Err(why) = self.check_nick(nick) {
            cx.write(format!("error: {why}\r\n{PROMPT}").as_bytes());
            return;
        }
        let others: Vec<&str> = self.members.keys().map(String::as_str).collect();
        let company = match others.len() {
            0 => "you are the first one here".to_string(),
            n => format!("{} here: {}", plural(n, "other"), others.join(", ")),
        };
        let welcome = format!("* welcome, {nick}; {company}. /help lists commands\r\n");
        cx.write(welcome.as_bytes());
        // Members may stay silent for hours: no idle timeout for them.
        cx.set_idle_timeout(None);
        self.tell_others(cx, None, &format!("* {nick} joined"));
        self.members.insert(
            nick.to_string(),
            Member {
                id: cx.id(),
                over_soft_since: None,
            },
        );
        s.nick = Some(nick.to_string());
    }

    fn check_nick(&self, nick: &str) -> Result<(), String> {
        let valid = (1..=MAX_NICK).contains(&nick.len())
            && nick
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            Err(format!(
                "a nickname is 1-{MAX_NICK} letters, digits, '_' or '-'"
            ))
        } else if self.members.contains_key(nick) {
            Err(format!("nickname {nick} is taken"))
        } else {
            Ok(())
        }
    }

    fn command(&mut self, cx: &mut Context<'_>, s: &mut Session, nick: &str, line: &str) {
        let (cmd, arg) = match line.split_once(' ') {
            Some((cmd, arg)) => (cmd, arg.trim()),
            None => (line, ""),
        };
        let me = Some(cx.id());
        match cmd {
            "/nick" => {
                if arg == nick {
                    return cx.write(format!("* you are {nick} already\r\n").as_bytes());
                }
                if let Err(why) = self.check_nick(arg) {
                    return cx.write(format!("error: {why}\r\n").as_bytes());
                }
                let member = self.members.remove(nick).expect("members know every nick");
                self.members.insert(arg.to_string(), member);
                s.nick = Some(arg.to_string());
                cx.write(format!("* you are now {arg}\r\n").as_bytes());
                self.tell_others(cx, me, &format!("* {nick} is now known as {arg}"));
            }
            "/who" => {
                let names: Vec<&str> = self.members.keys().map(String::as_str).collect();
                let line = format!(
                    "* {}: {}\r\n",
                    plural(names.len(), "member"),
                    names.join(", ")
                );
                cx.write(line.as_bytes());
            }
            "/me" if !arg.is_empty() => {
                self.tell_others(cx, me, &format!("* {nick} {arg}"));
            }
            "/msg" => {
                let Some((to, text)) = arg.split_once(' ') else {
                    return cx.write(b"error: usage: /msg NICK TEXT\r\n");
                };
                let now = cx.now();
                match self.members.get_mut(to) {
                    Some(member) => {
                        let line = format!("*{nick}* {}", text.trim());
                        deliver(cx, member, line.as_bytes(), &self.caps, now);
                    }
                    None => cx.write(format!("error: no such nickname {to}\r\n").as_bytes()),
                }
            }
            "/quit" => {
                s.quit = (!arg.is_empty()).then(|| arg.to_string());
                cx.write(b"* bye\r\n");
                cx.close();
            }
            "/help" => cx.write(HELP.as_bytes()),
            _ => {
                cx.protocol_error();
                let line = format!("error: unknown command {cmd}; /help lists commands\r\n");
                cx.write(line.as_bytes());
            }
        }
    }
}

/// Queues one line (given without its line end) for `member`, enforcing
/// the output caps.
fn deliver(cx: &mut Context<'_>, member: &mut Member, line: &[u8], caps: &Caps, now: Instant) {
    match cx.send_frame(member.id, &mut super::reply_lines(), line) {
        Ok(true) => {}
        Ok(false) => return, // already closing
        Err(e) => {
            log::debug!("chat line not sent: {e}");
            return;
        }
    }
    let pending = cx.output_len_of(member.id).unwrap_or(0);
    if pending > caps.hard {
        cx.evict(member.id, EVICTED);
    } else if pending > caps.soft {
        let since = *member.over_soft_since.get_or_insert(now);
        if now.duration_since(since) >= caps.soft_for {
            cx.evict(member.id, EVICTED);
        }
    } else {
        member.over_soft_since = None;
    }
}

/// What replaces a control character in a member's line (see the module
/// docs, "What reaches other members' terminals").
pub const CONTROL_REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// `line` with every control character but TAB replaced by
/// [`CONTROL_REPLACEMENT`]; borrowed when there is none (the usual case).
fn printable(line: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\t';
    if !line.contains(unsafe_char) {
        return Cow::Borrowed(line);
    }
    Cow::Owned(
        line.chars()
            .map(|c| {
                if unsafe_char(c) {
                    CONTROL_REPLACEMENT
                } else {
                    c
                }
            })
            .collect(),
    )
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

impl FrameService for Chat {
    type Session = Session;

    fn on_connect(&mut self, cx: &mut Context<'_>) -> Session {
        cx.write(format!("* welcome to muxserve chat\r\n{PROMPT}").as_bytes());
        Session::default()
    }

    fn on_frame(&mut self, cx: &mut Context<'_>, s: &mut Session, line: &[u8]) {
        let Ok(line) = std::str::from_utf8(line) else {
            cx.protocol_error();
            return cx.write(b"error: that line is not UTF-8; not sent\r\n");
        };
        // Before anything else looks at it, so every command and every
        // relayed piece of the line is free of terminal controls.
        let line = printable(line);
        let line = &*line;
        let Some(nick) = s.nick.clone() else {
            return self.register(cx, s, line.trim());
        };
        if line.starts_with('/') && !line.starts_with("//") {
            return self.command(cx, s, &nick, line);
        }
        let text = line.strip_prefix('/').unwrap_or(line);
        if !text.is_empty() {
            self.tell_others(cx, Some(cx.id()), &format!("<{nick}> {text}"));
        }
    }

    fn on_frame_error(&mut self, cx: &mut Context<'_>, _: &mut Session, err: &FrameError) {
        cx.write(format!("error: {err}; not sent\r\n").as_bytes());
    }

    fn on_close(&mut self, cx: &mut Context<'_>, s: Session, why: CloseReason) {
        let Some(nick) = s.nick else {
            return;
        };
        self.members.remove(&nick);
        let reason = match (s.quit, why) {
            (Some(reason), _) => format!(" ({reason})"),
            (None, CloseReason::OutputLimit) => " (not reading)".to_string(),
            (None, CloseReason::Closed) => String::new(),
            (None, why) => format!(" ({why})"),
        };
        self.tell_others(cx, None, &format!("* {nick} left{reason}"));
    }

    fn on_shutdown(&mut self, cx: &mut Context<'_>) {
        self.tell_others(cx, None, "* the server is shutting down; goodbye");
        for member in self.members.values() {
            cx.close_conn(member.id);
        }
    }
}
