"""The shapes edit task: procedural 128x128 scenes, instructions, and reading shapes back from pixels."""
