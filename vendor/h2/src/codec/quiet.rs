use std::time::{Duration, Instant};

/// Frames are counted over windows of this length.
const WINDOW: Duration = Duration::from_secs(1);

/// A side of a connection that has handled this many frames in the current window is
/// busy and keeps its buffer between frames.
const BUSY_FRAMES: u32 = 16;

/// Whether one side of a connection (its reads or its writes) should give its buffer
/// back when the buffer is empty: yes unless the connection is busy. A busy connection
/// keeps its buffers from one exchange to the next (allocating them per exchange cost
/// about a third more CPU per request under load); an idle one (keepalive pings, the
/// odd request) gives them back after each frame or exchange.
#[derive(Debug)]
pub(crate) struct Quiet {
    window_start: Instant,
    frames: u32,
}

impl Quiet {
    pub(crate) fn new() -> Quiet {
        Quiet {
            window_start: Instant::now(),
            frames: 0,
        }
    }

    /// A frame was read or queued.
    pub(crate) fn activity(&mut self) {
        let now = Instant::now();
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.frames = 0;
        }
        self.frames = self.frames.saturating_add(1);
    }

    /// Whether the (empty) buffer should be given back now.
    pub(crate) fn release(&self) -> bool {
        self.frames < BUSY_FRAMES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_side_keeps_its_buffer_until_a_quiet_window() {
        let mut q = Quiet::new();
        for _ in 0..BUSY_FRAMES - 1 {
            q.activity();
        }
        assert!(q.release(), "a few frames: not busy");
        q.activity();
        assert!(!q.release(), "busy");
        q.window_start -= WINDOW;
        q.activity();
        assert!(q.release(), "a new window after a quiet spell");
    }
}
