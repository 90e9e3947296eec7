"""Methods as recipes of components: Super-AND and the ancestors its paper compares with.

A recipe fills every component the command line left unset; a component given as a flag
always wins, so an ablation is one flag away (`--method super-and --no-ue-loss`).
Sources: the papers and their released code (docs/ALGORITHM.md 8 lists the reported accuracies).

- lemniscate (Wu et al. 2018): memory bank + full-softmax instance loss (T 0.1, bank
  momentum 0.5), one view, no Sobel, no flip, one round, SGD without Nesterov.
- isif (Ye et al. 2019): no bank; the in-batch two-view loss on the 128-d embeddings (T 0.1);
  no Sobel. kNN then uses embeddings recomputed from the network (there is no bank).
- and (Huang et al. 2019): bank + anchor-neighbourhood rounds (5 x 200), one view, no Sobel,
  no flip, no augmentation or UE loss.
- super-and (Han et al. 2020): everything, as released.
"""
from .constants import ALGORITHM

RELEASED_ROUNDS = ALGORITHM['rounds']

COMPONENTS = {
    # name: help text (the flag is --name with dashes, or --no-name for booleans)
    'sobel': 'the Sobel-edge branch of the network',
    'views': 'augmented views of each image per step (1 or 2)',
    'bank': 'the memory bank and its (anchor-neighbourhood) instance loss',
    'aug_loss': 'the in-batch augmentation-invariance loss (needs 2 views)',
    'aug_input': 'rows of that loss: the bank logits (as released) or the 128-d features',
    'ue_loss': 'the unification-entropy loss (needs the bank)',
    'flip': 'random horizontal flips in the augmentation',
    'nesterov': 'Nesterov momentum in SGD',
    'rounds': 'rounds; anchors are added from the second on (needs the bank)',
}

RECIPES = {
    'super-and': dict(sobel=True, views=2, bank=True, aug_loss=True, aug_input='logits',
                      ue_loss=True, flip=True, nesterov=True, rounds=RELEASED_ROUNDS),
    'and': dict(sobel=False, views=1, bank=True, aug_loss=False, aug_input='logits',
                ue_loss=False, flip=False, nesterov=True, rounds=RELEASED_ROUNDS),
    'isif': dict(sobel=False, views=2, bank=False, aug_loss=True, aug_input='features',
                 ue_loss=False, flip=True, nesterov=True, rounds=1),
    'lemniscate': dict(sobel=False, views=1, bank=True, aug_loss=False, aug_input='logits',
                       ue_loss=False, flip=False, nesterov=False, rounds=1),
}


class RecipeError(ValueError):
    """Components that cannot work together; the message is one sentence to print."""


def components_of(method: str, given: dict) -> dict:
    """Every component of a run of `method`: those in `given` (name: value, as flags or the
    run a checkpoint continues set them; None or absent: not set), the rest from the method's
    recipe.

    Raises:
        RecipeError: components that cannot work together (an augmentation loss with one view,
            a UE loss or rounds without the bank, nothing to train).
    """
    recipe = RECIPES[method]
    chosen = {name: recipe[name] if given.get(name) is None else given[name]
              for name in COMPONENTS}
    if chosen['aug_loss'] and chosen['views'] != 2:
        raise RecipeError('the augmentation loss compares two views of each image: use '
                          '--views 2 or --no-aug-loss')
    if not chosen['bank']:
        # Name what left the bank out: the flag if typed, else the recipe.
        why = '--no-bank' if given.get('bank') is not None else f'--method {method}'
        if chosen['ue_loss']:
            raise RecipeError(f'the UE loss is taken over the memory bank, which {why} leaves '
                              f'out: add --no-ue-loss' + (' or drop --no-bank' if
                                                          why == '--no-bank' else ''))
        if not chosen['aug_loss']:
            raise RecipeError('without the bank and the augmentation loss nothing is trained')
        if chosen['aug_input'] == 'logits':
            if given.get('aug_input') is not None:
                raise RecipeError('--aug-input logits needs the memory bank')
            chosen['aug_input'] = 'features'    # the recipe's logits: there are none
        if chosen['rounds'] > 1:
            raise RecipeError(f'rounds add anchors from the memory bank, which {why} leaves '
                              f'out: use --rounds 1')
    return chosen
