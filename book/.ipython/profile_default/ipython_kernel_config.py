# Kernel settings for `make execute` and `make notebooks` (the Makefile points IPYTHONDIR here).
# TensorFlow's C++ runtime writes start-up log lines straight to file descriptor 2; keeping them out
# of the notebook makes stored outputs the same on every machine (they still reach the terminal).
c = get_config()  # noqa: F821
c.IPKernelApp.capture_fd_output = False
