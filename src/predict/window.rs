//! The sliding window of load readings the predictor sees.

use super::PredictError;

/// Default number of readings kept (DESIGN.md §1).
pub const DEFAULT_CAPACITY: usize = 5;

/// The last `capacity` readings, oldest first. Only finite readings get in: a stale or
/// missing reading is not a value and must not be pushed as one.
///
/// Storage is a `Vec` shifted on overflow: windows are a handful of readings, and a
/// contiguous slice is what the predictors take.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    capacity: usize,
    values: Vec<f64>,
}

impl Window {
    /// An empty window holding at most `capacity` readings (at least 1).
    pub fn new(capacity: usize) -> Result<Self, PredictError> {
        if capacity == 0 {
            return Err(PredictError::InvalidCapacity(capacity));
        }
        Ok(Window {
            capacity,
            values: Vec::with_capacity(capacity),
        })
    }

    /// Append a reading, dropping the oldest when full. A NaN or infinite reading is
    /// refused and leaves the window as it was.
    pub fn push(&mut self, value: f64) -> Result<(), PredictError> {
        if !value.is_finite() {
            return Err(PredictError::NonFinite {
                index: self.values.len().min(self.capacity - 1),
                value,
            });
        }
        if self.values.len() == self.capacity {
            self.values.remove(0);
        }
        self.values.push(value);
        Ok(())
    }

    /// The readings, oldest first.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// The newest reading.
    pub fn last(&self) -> Option<f64> {
        self.values.last().copied()
    }

    /// Forget every reading (after a migration: the next host starts a new series).
    pub fn clear(&mut self) {
        self.values.clear();
    }

    /// Number of readings held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when no reading is held.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// True when the window holds `capacity` readings.
    pub fn is_full(&self) -> bool {
        self.values.len() == self.capacity
    }

    /// The most readings the window holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Default for Window {
    /// An empty window of [`DEFAULT_CAPACITY`] readings.
    fn default() -> Self {
        Window {
            capacity: DEFAULT_CAPACITY,
            values: Vec::with_capacity(DEFAULT_CAPACITY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_keeps_the_newest_readings_oldest_first() {
        let mut w = Window::new(3).unwrap();
        for v in [1.0, 2.0, 3.0, 4.0, 5.0] {
            w.push(v).unwrap();
        }
        assert_eq!(w.values(), &[3.0, 4.0, 5.0]);
        assert!(w.is_full());
        assert_eq!(w.last(), Some(5.0));
    }

    #[test]
    fn default_window_holds_five_readings() {
        let mut w = Window::default();
        assert_eq!(w.capacity(), 5);
        for v in 0..7 {
            w.push(f64::from(v)).unwrap();
        }
        assert_eq!(w.values(), &[2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn clear_empties_the_window() {
        let mut w = Window::default();
        w.push(1.0).unwrap();
        w.clear();
        assert!(w.is_empty());
        assert_eq!(w.len(), 0);
        assert_eq!(w.last(), None);
    }

    #[test]
    fn non_finite_reading_is_refused_and_the_window_is_unchanged() {
        let mut w = Window::default();
        w.push(1.0).unwrap();
        assert!(matches!(
            w.push(f64::NAN),
            Err(PredictError::NonFinite { .. })
        ));
        assert!(w.push(f64::INFINITY).is_err());
        assert_eq!(w.values(), &[1.0]);
    }

    #[test]
    fn zero_capacity_is_refused() {
        assert_eq!(Window::new(0), Err(PredictError::InvalidCapacity(0)));
    }
}
