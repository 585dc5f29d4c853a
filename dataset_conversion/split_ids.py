"""Case and patient IDs of the published splits the converters reproduce.

Copied from the published split files (kept in the repository as ``tests/data/splits/*.json``) because an installed package cannot read
them at run time; the tests check these lists against the files. Each list names its public source.
"""
from __future__ import annotations

# Synapse: TransUNet's lists/lists_Synapse (Beckschen/TransUNet@02ef001): train.txt / test_vol.txt.
SYNAPSE_TRANSUNET_TRAIN = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)
SYNAPSE_TRANSUNET_TEST = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)

# Synapse raw release: labelled training CTs (0011-0020 do not exist) and unlabelled test CTs.
SYNAPSE_LABELLED = tuple(range(1, 11)) + tuple(range(21, 41))
SYNAPSE_UNLABELLED = tuple(range(61, 81))

# ACDC: MT-UNet's 70/10/20 patient split (as used by TransUNet-family 2D papers; AgileFormer lists_ACDC).
ACDC_MTUNET_TRAIN = (
    1, 4, 5, 6, 7, 10, 11, 13, 15, 16, 18, 20, 22, 23, 25, 26, 27, 28, 30, 31, 32, 34, 35, 36, 37, 38, 39, 40,
    43, 44, 45, 46, 47, 51, 52, 54, 56, 57, 58, 59, 60, 62, 63, 65, 66, 68, 69, 70, 72, 73, 74, 75, 77, 78, 82,
    83, 84, 85, 86, 87, 89, 90, 91, 93, 94, 96, 97, 98, 99, 100,
)
ACDC_MTUNET_VAL = (19, 21, 29, 33, 41, 50, 61, 71, 76, 80)
ACDC_MTUNET_TEST = (2, 3, 8, 9, 12, 14, 17, 24, 42, 48, 49, 53, 55, 64, 67, 79, 81, 88, 92, 95)

# ACDC: nnFormer's 70/10/20 split (same 20 test patients as MT-UNet, a different validation set).
ACDC_NNFORMER_TRAIN = (
    1, 4, 5, 6, 7, 10, 11, 13, 15, 16, 18, 19, 20, 21, 22, 23, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37,
    38, 39, 40, 41, 43, 44, 45, 46, 47, 50, 51, 52, 54, 56, 57, 58, 59, 60, 61, 62, 63, 65, 66, 68, 69, 70, 71, 72,
    73, 74, 75, 76, 77, 78, 80, 82, 83, 84, 85, 86, 87,
)
ACDC_NNFORMER_VAL = (89, 90, 91, 93, 94, 96, 97, 98, 99, 100)
ACDC_NNFORMER_TEST = ACDC_MTUNET_TEST

# ACDC release: labelled training patients 001-100; the official test set is 101-150.
ACDC_TRAINING_PATIENTS = tuple(range(1, 101))
ACDC_TEST_PATIENTS = tuple(range(101, 151))
