"""The commands. Each root script (python clip.py, python app.py, ...) and each console script (fashion-clip,
fashion-app, ...) runs the main() of one of these modules."""
