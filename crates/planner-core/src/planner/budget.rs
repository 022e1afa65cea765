//! Budgets: dispatches, attempts, tokens and wall time. Passing one stops the plan in failure;
//! each check says whether the plan goes on.

use super::Decision;
use crate::config::BudgetKind;
use crate::event::FailureReason;
use crate::types::Timestamp;

impl Decision<'_> {
    /// Stops the plan if reported tokens passed the budget; returns whether it goes on.
    pub(super) fn check_tokens(&mut self, now: Timestamp) -> bool {
        if let Some(limit) = self.state.config.budgets.max_tokens {
            let used = self.state.usage.tokens;
            if used > limit {
                self.stop(
                    FailureReason::BudgetExceeded {
                        budget: BudgetKind::Tokens,
                        limit,
                        used,
                    },
                    now,
                );
                return false;
            }
        }
        true
    }

    /// Stops the plan if its wall time reached the budget at `now`; returns whether it goes on.
    pub(super) fn check_wall_time(&mut self, now: Timestamp) -> bool {
        if let (Some(limit), Some(start)) = (
            self.state.config.budgets.max_wall_time_ms,
            self.state.started_at,
        ) {
            let used = now.as_millis().saturating_sub(start.as_millis());
            if used >= limit {
                self.stop(
                    FailureReason::BudgetExceeded {
                        budget: BudgetKind::WallTime,
                        limit,
                        used,
                    },
                    now,
                );
                return false;
            }
        }
        true
    }

    /// Stops the plan if one more dispatch (of work, when `work`) would pass a budget; returns
    /// whether it may go ahead.
    pub(super) fn admit_dispatch(&mut self, work: bool, now: Timestamp) -> bool {
        let budgets = &self.state.config.budgets;
        let usage = self.state.usage;
        let over = if budgets
            .max_dispatches
            .is_some_and(|l| usage.dispatches >= l)
        {
            budgets
                .max_dispatches
                .map(|l| (BudgetKind::Dispatches, l, usage.dispatches + 1))
        } else if work && budgets.max_attempts.is_some_and(|l| usage.attempts >= l) {
            budgets
                .max_attempts
                .map(|l| (BudgetKind::Attempts, l, usage.attempts + 1))
        } else {
            None
        };
        match over {
            Some((budget, limit, used)) => {
                self.stop(
                    FailureReason::BudgetExceeded {
                        budget,
                        limit,
                        used,
                    },
                    now,
                );
                false
            }
            None => true,
        }
    }
}
