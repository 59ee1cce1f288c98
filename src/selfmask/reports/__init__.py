"""Reports: Markdown tables and PNG plots of results (matplotlib, headless)."""

from selfmask.reports.plots import plot_lowshot, plot_sparsity, plot_training_loss
from selfmask.reports.tables import markdown_table

__all__ = ["markdown_table", "plot_lowshot", "plot_sparsity", "plot_training_loss"]
