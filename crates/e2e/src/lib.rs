//! End-to-end tests (in `tests/`): the real kas, agentk, kasctl and kubectl against
//! the test API server. This library is empty.
