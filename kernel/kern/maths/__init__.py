"""Pure maths shared by the drivers: training timestep distributions and their shift rules."""
