# Kernel settings for `make execute` and `make notebooks` (the Makefile points IPYTHONDIR here).
# TensorFlow's C++ runtime writes start-up log lines straight to file descriptor 2; keeping them out
# of the notebook makes stored outputs the same on every machine (they still reach the terminal).
c = get_config()  # noqa: F821
c.IPKernelApp.capture_fd_output = False

# Figures for the book's 740 px text column. "retina": the PNG is stored at twice figure.dpi (144 dpi
# for the notebooks' 72) with width / height metadata of its logical size, so it is shown at
# figsize x 72 px and stays sharp on high-density screens. Fonts of 11 pt (matplotlib's default is
# 10) are 11 px at that size. A cell's output area is 676 px wide at a 1280 px window, so a figure
# wider than about 9.4 in is scaled down (a 10 in figure shows its 11 pt text at 10.4 px).
# The notebooks pin figure.dpi = 72 themselves: the "<Figure size WxH ...>" lines that nbval compares
# are figsize x figure.dpi and do not depend on this file. Kernels without this profile (Colab, a
# plain `jupyter lab`) get the same from dlnotes.viz.use_book_style(), which every notebook's Colab
# cell calls.
c.InlineBackend.figure_formats = {"retina"}
c.InlineBackend.rc = {"font.size": 11}
