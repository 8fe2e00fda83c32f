"""One router per kind of question; each depends on the caller's scope."""
