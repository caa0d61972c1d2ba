//! Bodies for the data plane's unit tests: an upstream's answer given as its frames.

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;

/// A body of the given frames, then its end, or (`open`) nothing more ever: a stream the
/// upstream still holds open.
pub struct Frames {
    frames: VecDeque<Bytes>,
    open: bool,
}

impl Frames {
    /// Ends after its frames.
    pub fn ending(frames: impl IntoIterator<Item = Bytes>) -> Frames {
        Frames {
            frames: frames.into_iter().collect(),
            open: false,
        }
    }

    /// Never ends: pending after its frames.
    pub fn open(frames: impl IntoIterator<Item = Bytes>) -> Frames {
        Frames {
            open: true,
            ..Frames::ending(frames)
        }
    }
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.frames.pop_front() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None if self.open => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}
