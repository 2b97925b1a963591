"""Word lists the Fact Unit checks replies with.

SYMPTOM_TERMS: things a patient can claim to have; claiming one that the
profile does not support is an invented symptom. EVERYDAY_WORDS: words a
patient reply may use without any fact behind them (the rest must come from
the profile, the dialogue or the persona templates).
"""

from m2.verifier import text

_SYMPTOMS = """
pain ache aches aching hurt hurts sore soreness cramp cramps cramping burning stinging throbbing
fever chills sweats sweating cough sputum phlegm wheeze wheezing rash hives itching lump mass
bump swelling bleeding bruising bruise numbness tingling weakness paralysis tremor shaking
dizziness vertigo fainting syncope seizure confusion memory headache migraine nausea vomiting
diarrhea constipation bloating gas heartburn reflux jaundice fatigue insomnia anxiety depression
palpitations dyspnea wheezing hoarseness congestion sneezing runny discharge spotting stiffness
limp blurred blindness diplopia deafness tinnitus earache toothache hemoptysis hematuria
hematochezia melena dysuria frequency urgency incontinence impotence infertility amenorrhea
ulcer sore blister lesion wound scar mole spot patch drooping ptosis twitching spasm spasms
weight_loss weight_gain appetite thirst polyuria chest_pain abdominal_pain arthralgia myalgia
edema dysphagia emesis pruritus dyspepsia fatigue hallucinations delusions
"""
# Synonym groups that name things a patient has (not people, places, drugs or tests).
_NOT_SYMPTOM_GROUPS = {"physician", "emergency", "medication", "smoking", "alcohol", "pregnancy",
                       "infant", "child", "hydration", "ecg", "cbc", "ct", "mri", "xray",
                       "ultrasound"}
SYMPTOM_TERMS = frozenset(t if "_" in t else text.stem(t) for t in _SYMPTOMS.split()) | frozenset(
    text.terms(" ".join(g[0] for g in text.SYNONYM_GROUPS if g[0] not in _NOT_SYMPTOM_GROUPS)))

_EVERYDAY = """
i me my mine feel feeling felt think thought know knew guess maybe sure yes no not really just
little bit lot lots much many more less some any few several quite very pretty kind sort like
been being have has had get got getting go going went come came coming started start starting
since ago week weeks day days month months year years time times today yesterday morning night
evening afternoon now lately recently sometimes often always never usually once twice again
still also too even though although because when while before after during ever worse better
bad good okay fine well same different new old first last next other thing things something
anything nothing everything way ways lot doctor doc worried worry worrying scared afraid nervous
concerned upset annoyed frustrated tired hope hoping honestly actually basically mean means say
said tell told ask asked see seen look looked looks notice noticed happen happened happening
help helps helped make made take taking took give gave need needs want wanted try tried keep
kept work working home family wife husband kids son daughter mother father mom dad friend job
body side left right back front top bottom part area around down up out over off along
what why how which who where whether that this those these there here can could would should
will might must may do does did done let lets okay alright sorry thanks thank please
serious wrong problem problems issue issues question questions treatment treat treated plan
medicine test tests result results exam examination check checked normal usual going come
much long short hours hour minutes minute lately bothering bother bothers trouble remember
don't can't won't isn't it's i'm i've i'd that's there's what's deal dealing getting
stuff probably definitely exactly anyway course understand sure idea clue
"""
EVERYDAY_WORDS = frozenset(text.terms(_EVERYDAY)) | frozenset(
    text.stem(w) for w in _EVERYDAY.split())
