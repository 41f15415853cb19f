"""Budgets: spend limits per day or month, enforced exactly by reserving worst-case cost."""

from metergate.budgets.book import BudgetBook, Reservation

__all__ = ["BudgetBook", "Reservation"]
