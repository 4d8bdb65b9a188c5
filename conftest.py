"""Makes the repo root importable for the tests (`import models`, `import utils`)."""
