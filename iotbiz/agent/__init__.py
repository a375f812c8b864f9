"""The device agent (see DESIGN.md, "Agent")."""
