//! fp16's dynamic loss scaling as megatron-core's `DynamicGradScaler` does it: the loss is
//! multiplied by the scale before the backward pass and the gradients divided by it after; a
//! step whose gradients hold an inf or NaN is skipped; `hysteresis` such steps in a row halve
//! the scale (never below `min_scale`), `growth_interval` good steps in a row double it.

/// The scaler's state (what a checkpoint keeps).
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    pub min_scale: f64,
    pub growth_interval: u64,
    pub hysteresis: u64,
    /// Good steps since the last change.
    pub growth_tracker: u64,
    /// Skips left before the scale backs off.
    pub hysteresis_tracker: u64,
}

impl LossScaler {
    pub fn new(initial: f64, min_scale: f64, growth_interval: u64, hysteresis: u64) -> Self {
        LossScaler {
            scale: initial,
            min_scale,
            growth_interval,
            hysteresis,
            growth_tracker: 0,
            hysteresis_tracker: hysteresis,
        }
    }

    /// After a step: `found_inf` when its gradients were not finite (the step was skipped).
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.growth_tracker = 0;
            self.hysteresis_tracker = self.hysteresis_tracker.saturating_sub(1);
            if self.hysteresis_tracker == 0 {
                self.scale = (self.scale * 0.5).max(self.min_scale);
            }
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.growth_interval {
                self.growth_tracker = 0;
                self.hysteresis_tracker = self.hysteresis;
                self.scale *= 2.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_after_hysteresis_skips_and_grows_after_the_window() {
        let mut s = LossScaler::new(1024.0, 1.0, 3, 2);
        s.update(true);
        assert_eq!(s.scale, 1024.0, "one skip: hysteresis holds the scale");
        s.update(true);
        assert_eq!(s.scale, 512.0);
        s.update(true);
        assert_eq!(
            s.scale, 256.0,
            "tracker stays spent until the scale grows again"
        );
        for _ in 0..3 {
            s.update(false);
        }
        assert_eq!((s.scale, s.hysteresis_tracker), (512.0, 2));
        let mut low = LossScaler::new(1.0, 1.0, 1000, 1);
        low.update(true);
        assert_eq!(low.scale, 1.0, "never below min_scale");
    }
}
