//! kernel (in progress)
