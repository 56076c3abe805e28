//! What a hostile guest can send the host's `agentvm-guest` connection: any bytes, read as
//! the host's reader does — the sync scan (bounded), then frames until one fails. Must
//! never panic, allocate past a frame's checked length, or decode a frame that does not
//! encode back to the same message.
#![no_main]

use std::io::Cursor;

use agentvm_guest::{encode, read_frame, scan_for, Frame, ToHost, GUEST_SYNC, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks whether the input starts after the sync (frames only) or before it.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut r = Cursor::new(rest);
    if mode & 1 == 1 && !matches!(scan_for(&mut r, &GUEST_SYNC, 42, 4096), Ok(true)) {
        return;
    }
    let mut buf = Vec::new();
    while let Ok(Frame { stream, msg }) = read_frame::<ToHost>(&mut r, &mut buf) {
        assert!(buf.len() <= MAX_FRAME);
        let wire = encode(stream, &msg);
        let back: Frame<ToHost> = read_frame(&mut Cursor::new(&wire), &mut Vec::new())
            .expect("an accepted frame encodes back");
        assert_eq!(back.msg, msg);
        assert!(msg.cost() >= agentvm_guest::FRAME_COST);
    }
});
