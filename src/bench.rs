//! The data-engine benchmark behind `stateshift bench`.
