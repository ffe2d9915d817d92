"""Linear blend skinning (LBS) primitives for FLAME/SMPL-style face and body models.

Written from the model definition (Loper et al., "SMPL", SIGGRAPH Asia 2015; Li et al.,
"FLAME", SIGGRAPH Asia 2017), not ported from a reference implementation:

1. ``rodrigues``: axis-angle vectors -> rotation matrices, numerically stable and with
   finite gradients at zero rotation.
2. ``pose_features``: the pose-corrective input, (R_j - I) of the non-root joints, flattened.
3. ``kinematic_transforms``: chain joint rotations down the kinematic tree and return, per
   joint, the rigid transform that maps a rest-pose point to its posed position.
4. ``skin``: blend the per-joint transforms with the skinning weights and apply them.

All functions are batched, device-agnostic and differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["kinematic_transforms", "pose_features", "rodrigues", "skin"]

# Below this squared angle the Taylor series of sin(t)/t and (1 - cos t)/t^2 is used; the
# truncation error (t^4 / 120) is far below float32 resolution there.
_SMALL_ANGLE_SQ = 1e-6


def rodrigues(rotvec: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors to rotation matrices.

    ``rotvec`` (..., 3): rotation axis times angle in radians. Returns (..., 3, 3) with
    ``R = I + a K + b K^2``, K the cross-product matrix of ``rotvec``, a = sin(t)/t and
    b = (1 - cos t)/t^2 = 2 sin^2(t/2)/t^2 (the half-angle form keeps float32 precision
    at small angles). Gradients are finite everywhere, including at the zero vector.
    """
    if rotvec.shape[-1] != 3:
        raise ValueError(f"rodrigues expects (..., 3) axis-angle vectors, got shape {tuple(rotvec.shape)}")
    x, y, z = rotvec.unbind(-1)  # each (...)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).unflatten(-1, (3, 3))  # (..., 3, 3)

    theta_sq = (rotvec * rotvec).sum(-1)  # (...)
    small = theta_sq < _SMALL_ANGLE_SQ
    # Evaluate the exact branch on a safe value where it is not used, so neither branch
    # produces inf/nan (which would poison the gradient through torch.where).
    safe_sq = torch.where(small, torch.ones_like(theta_sq), theta_sq)
    theta = safe_sq.sqrt()
    a_exact = torch.sin(theta) / theta
    b_exact = 2.0 * torch.sin(0.5 * theta) ** 2 / safe_sq
    a = torch.where(small, 1.0 - theta_sq / 6.0, a_exact)[..., None, None]  # (..., 1, 1)
    b = torch.where(small, 0.5 - theta_sq / 24.0, b_exact)[..., None, None]  # (..., 1, 1)

    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + a * skew + b * (skew @ skew)  # (..., 3, 3)


def pose_features(rot_mats: torch.Tensor) -> torch.Tensor:
    """Pose-corrective blendshape input: (R_j - I) for every non-root joint, flattened.

    ``rot_mats`` (B, J, 3, 3) -> (B, 9 * (J - 1)); entry 9*(j-1) + 3*r + c is
    (R_j - I)[r, c], matching FLAME/SMPL ``posedirs`` (V, 3, 9 * (J - 1)).
    """
    eye = torch.eye(3, dtype=rot_mats.dtype, device=rot_mats.device)
    return (rot_mats[:, 1:] - eye).flatten(1)  # (B, 9 * (J - 1))


def kinematic_transforms(
    rot_mats: torch.Tensor, joints: torch.Tensor, parents: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain local joint rotations along the kinematic tree.

    ``rot_mats`` (B, J, 3, 3): local rotation of each joint about itself;
    ``joints`` (B, J, 3): rest-pose joint locations; ``parents``: parent index per joint,
    -1 for the root, with ``parents[j] < j`` (topological order).

    Returns ``posed_joints`` (B, J, 3) and ``transforms`` (B, J, 3, 4): per joint the rigid
    map [R | t] taking a rest-pose point p to ``R @ p + t``, i.e. the world transform of the
    joint composed with the inverse of its rest-pose placement.
    """
    num_joints = joints.shape[1]
    if len(parents) != num_joints or rot_mats.shape[1] != num_joints:
        raise ValueError(
            f"kinematic_transforms: {len(parents)} parents, {rot_mats.shape[1]} rotations and "
            f"{num_joints} joints must agree"
        )
    world_rot: list[torch.Tensor] = []  # each (B, 3, 3)
    world_pos: list[torch.Tensor] = []  # each (B, 3)
    for j, parent in enumerate(parents):
        if parent < 0:
            world_rot.append(rot_mats[:, j])
            world_pos.append(joints[:, j])
            continue
        if parent >= j:
            raise ValueError(f"kinematic_transforms: parent {parent} of joint {j} must come before it")
        offset = joints[:, j] - joints[:, parent]  # (B, 3) rest-pose bone vector
        world_rot.append(world_rot[parent] @ rot_mats[:, j])
        world_pos.append(world_pos[parent] + (world_rot[parent] @ offset[..., None])[..., 0])
    rot = torch.stack(world_rot, dim=1)  # (B, J, 3, 3)
    posed_joints = torch.stack(world_pos, dim=1)  # (B, J, 3)
    # p -> R (p - j_rest) + j_posed
    trans = posed_joints - (rot @ joints[..., None])[..., 0]  # (B, J, 3)
    return posed_joints, torch.cat([rot, trans[..., None]], dim=-1)  # (B, J, 3), (B, J, 3, 4)


def skin(vertices: torch.Tensor, weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Linear blend skinning.

    ``vertices`` (B, V, 3) rest-pose (shaped and pose-corrected) vertices; ``weights``
    (V, J) skinning weights (rows sum to 1); ``transforms`` (B, J, 3, 4) from
    ``kinematic_transforms``. Returns posed vertices (B, V, 3).
    """
    blended = (weights @ transforms.flatten(2)).unflatten(-1, (3, 4))  # (B, V, 3, 4) = [R | t] per vertex
    # R @ v + t as column-wise multiply-adds (much faster than V tiny 3x3 matmuls)
    return (
        blended[..., 3]
        + blended[..., 0] * vertices[..., 0:1]
        + blended[..., 1] * vertices[..., 1:2]
        + blended[..., 2] * vertices[..., 2:3]
    )  # (B, V, 3)
