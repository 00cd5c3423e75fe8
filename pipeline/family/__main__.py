from pipeline.config import stage_main
from pipeline.family import FamilyConfig, run

main = stage_main("family", FamilyConfig)(run)

if __name__ == "__main__":
    main()
