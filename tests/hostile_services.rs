//! Built-in services against hostile members, on every engine: a chat
//! member who sends terminal control characters must not reach the other
//! members' terminals with them.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use muxserve::services::{Builtin, Options};

/// Sends raw bytes (a line end included by the caller).
fn send_raw(c: &mut LineClient, bytes: &[u8]) {
    c.stream.write_all(bytes).expect("send");
}

/// The replacement character, as the room writes it.
const R: &str = "\u{FFFD}";

fn chat_replaces_control_characters_on_every_path(engine: Engine) {
    let server = start_builtin(engine, Builtin::Chat, Options::default());
    let addr = server.addr();
    let mut alice = join(addr, "alice");
    let mut bob = join(addr, "bob");
    alice.expect("* bob joined");

    // A bare CR that would put "bob: " over alice's own prefix, ESC
    // sequences (clear screen, set the title), NUL, DEL, a C1 CSI (valid
    // UTF-8, U+009B) and a TAB, which stays.
    send_raw(
        &mut alice,
        b"\rbob: hi\x1b[2J\x1b]0;owned\x07 \x00\x7f\xc2\x9b1m\tok\r\r\n",
    );
    bob.expect(&format!(
        "<alice> {R}bob: hi{R}[2J{R}]0;owned{R} {R}{R}{R}1m\tok{R}"
    ));

    // /me and /msg carry text too.
    send_raw(&mut alice, b"/me waves\x1b[1A\x08\n");
    bob.expect(&format!("* alice waves{R}[1A{R}"));
    send_raw(&mut alice, b"/msg bob \rpsst\x1b[0m\n");
    bob.expect(&format!("*alice* {R}psst{R}[0m"));

    // A nickname with a control character is refused like any other bad
    // one, to its owner only; the room hears nothing.
    send_raw(&mut alice, b"/nick al\x1bice\n");
    alice.expect("error: a nickname is 1-32 letters, digits, '_' or '-'");

    // Not UTF-8 (a raw C1 byte, 0x9b): an error line to the sender, and
    // nothing for the others.
    send_raw(&mut alice, b"raw \x9b1m\n");
    alice.expect("error: that line is not UTF-8; not sent");

    // The quit reason reaches everyone who stays.
    send_raw(&mut alice, b"/quit \x1b]0;bye\x07\n");
    alice.expect("* bye");
    alice.expect_eof();
    // The next thing bob sees is the leave notice: nothing of the refused
    // nickname or the non-UTF-8 line came before it.
    bob.expect(&format!("* alice left ({R}]0;bye{R})"));
    assert_silent(&mut bob.stream, Duration::from_millis(100));
}

on_every_engine!(chat_replaces_control_characters_on_every_path);
