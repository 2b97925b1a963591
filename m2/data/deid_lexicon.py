"""Word lists for the de-identification scrubber (`m2.data.deid`).

Common US first and last names (after the US Census frequency lists, plus the
Hispanic and Asian surnames frequent in US clinics), split by how safe they
are to match on their own:

- FIRST_NAMES / LAST_NAMES are matched anywhere (case-insensitive in all
  lower-case transcripts such as ACI-Bench, capitalised otherwise).
- AMBIGUOUS_NAMES are also English or clinical words ("white", "young",
  "grace", "mark", "ward", "walker"); they count as names only in a naming
  context: after a title, next to another name, after a greeting, or before
  "is a 45-year-old".

Eponyms ("Crohn", "Parkinson") are left out, and a name followed by
EPONYM_NEXT ("Murphy's sign", "Allen test") is kept as a medical term.
"""

FIRST_NAMES = frozenset("""
aaron abigail adam adrian alan albert alejandro alex alexander alexandra alexis alfred alice alicia
alison allison alyssa amanda amelia amy andre andrea andrew angela angelica anita ann anna
anne annie anthony antonio arthur ashley audrey austin barbara benjamin bernard beth betty beverly
billy blake bobby bonnie bradley brandon brenda brett brian brianna bridget brittany bruce bryan
caleb cameron carl carla carlos carmen carol caroline carolyn carrie catherine cathy charles
charlotte cheryl chloe christina christine christopher cindy claire clara clarence claudia clifford
colleen connie courtney craig crystal cynthia daniel danielle darlene darren david deborah debra
denise dennis derek diana diane dolores donald donna doris dorothy douglas dylan edith eduardo
edward edwin eileen elaine eleanor elena elijah elizabeth ella ellen emily emma eric erica erik erin
ernest esther ethan eugene evelyn felicia fernando florence frances francis francisco fred frederick
gabriel gabriela gail gary gena george gerald geraldine gilbert gina glen glenda gloria gordon
gregory gwendolyn haley hannah harold harry hazel heidi helen henry herbert howard ian irene isaac
isabel isabella jacob jacqueline jaime james jamie jane janet janice jared jason javier jeffrey
jenna jennifer jeremy jerome jerry jesse jessica jesus joan joann joanne joel john jonathan jordan
jorge jose joseph josephine joshua joyce juan juanita judith judy julia julian julie justin karen
katherine kathleen kathryn kathy katie kayla keith kelly kenneth kevin kimberly kristen kristin
kyle larry laura lauren lawrence leah leonard leslie lillian linda lindsay lindsey lisa lois
lorraine louis louise lucas lucille luis luke lydia lynn madeline madison manuel marcus margaret
maria marie marilyn mario marion marjorie martha martin marvin mary matthew maureen megan melanie
melinda melissa melvin michael michele michelle miguel mildred monica nancy naomi natalie nathan
nathaniel nicholas nicole noah norma oliver olivia oscar pamela patricia patrick paula pauline
peggy peter philip phillip phyllis priscilla rachel ralph ramon randall randy raymond rebecca regina
renee rhonda ricardo richard ricky rita robert roberta roberto rodney roger ronald rosa rosemary
roxanne ruth ryan samantha samuel sandra sara sarah scott sean sergio seth shannon sharon shawn
sheila shelby sherri shirley sophia stacy stanley stephanie stephen steven susan suzanne sylvia
tamara tammy tanya teresa theresa thomas timothy tina todd tommy tonya tracy travis tyler valerie
vanessa vera veronica vicki victor victoria vincent virginia walter wanda wayne wendy william
willie yolanda yvonne zachary
abby andy becky ben beth brad chris chuck dan danny dave debbie doug fred greg jeff jen jenny jim jimmy
joe joey johnny jon kate katy ken kenny liz matt mike mikey molly nate pam patty pete phil sally
sam steve stevie ted terry tim tina tom tony vicky
ahmed aisha akira amir ananya arjun chen deepak fatima hiroshi hui jun lakshmi mei mohammed muhammad
nguyen priya rahul raj ravi sanjay sunil wei xin ying yuki
""".split())

LAST_NAMES = frozenset("""
adams adkins aguilar alexander ali allen alvarado alvarez anderson andrews armstrong arnold atkins
austin bailey baldwin ballard barber barker barnes barnett barrett barton bates beck becker bennett
benson berry bishop blackman blair boone bowen bowers bowman boyd bradley brady brewer briggs brooks
bryant buchanan burgess burke burton butler byrd caldwell campbell cannon carlson carpenter carr
carroll carson carter castillo castro chambers chandler chang chapman chavez chen cheng christensen
clark clarke clayton cobb cohen coleman collier collins conner cooper copeland cortez crawford
cruz cummings cunningham curtis daniels davidson davis dawson delgado diaz dixon dominguez douglas
doyle duncan dunn edwards elliott ellis erickson estrada evans ferguson fernandez figueroa fisher
fitzgerald fleming fletcher flores ford foster fowler francis franklin frazier freeman fuller
garcia gardner garner garrett garza gibbs gibson gilbert goldberg gomez gonzales gonzalez goodman
goodwin gordon graham greene gregory griffin griffith guerrero gupta gutierrez guzman hamilton
hammond hampton hansen hanson harmon harper harrington harris harrison harvey hawkins hayes haynes
henderson hernandez herrera hicks higgins hines hodges hoffman holland holloway holmes holt hopkins
horton houston howard howell hubbard hudson huff hughes hunter ingram jackson jacobs jenkins jennings
jensen jimenez johnson johnston jones jordan joseph keller kelley kelly kennedy khan kim klein
knight kowalski kumar lambert larson lawrence lawson lewis li lin lindsey liu lloyd logan lopez
lowe lucas luna lynch maldonado malone manning marshall martin martinez mason massey mathis matthews
maxwell mccarthy mccoy mcdaniel mcdonald mcgee mckenzie mckinney medina mendez mendoza meyer miller
mitchell montgomery moore morales moran moreno morgan morris morrison moss mullins munoz murphy
murray myers nelson newman newton nguyen nichols norman norris nunez obrien oconnor oliver olson
ortega ortiz owens padilla palmer park parker parsons patel patrick patterson patton paul payne
pearson pena perez perkins perry peters peterson phelps phillips pierce pittman pope porter potter
powell pratt quinn ramirez ramos ramsey reese reeves reid reyes reynolds rhodes richards
richardson riley rios rivera roberson roberts robertson robinson rodgers rodriguez rodriquez rogers
romero ross rowe roy ruiz russell ryan salazar sanchez sanders sandoval santiago santos saunders
schmidt schneider schultz schwartz scott shah sharma shaw shelton sherman silva simmons simpson sims
singh smith snyder soto spencer stanley stephens stevens stevenson stewart stokes strickland
sullivan sutton swanson tanaka taylor thomas thompson thornton torres tores townsend tran tucker
turner tyler underwood valdez vargas vasquez vaughn vega wagner walsh walters walton wang warren
washington watkins watson weaver webb webber webster welch wells wheeler wilkerson wilkins
williams williamson willis wilson wolfe wong wright wu yang yates zhang zimmerman
""".split())

# Names that are also everyday or clinical words: matched only in a naming context.
AMBIGUOUS_NAMES = frozenset("""
amber april art baker ball banks bell berry bill black bob bond brown bush cash cox chase christian cliff
cook cross dale dawn day dean don drew ed faith fields fox frank gene good grace grant gray green
grey guy hall hardy hart heather hill hills holly hope hunt iris ivy jack jade jean joy june king
lance lane lee little long love mark max may miles mills page pat pearl penny price ray reed rich
rice rose ruby sage sandy sharp short small stone summer sue walker ward will white wise wood woods young
""".split())

# Abbreviated titles: the next word is a name unless it is a stopword. They
# count as written "Dr", "Ms", or lower case with a period ("ms."); "MR
# imaging" and "MS flare" are not titles.
TITLES = frozenset("dr mr mrs ms mx miss prof".split())
# Spelled-out titles: the next word must look like a name.
SOFT_TITLES = frozenset("doctor nurse professor mister missus sister miss".split())
GREETINGS = frozenset("hi hello hey morning afternoon evening bye goodbye thanks".split())

# After a name, these make it a medical eponym ("Murphy's sign", "Allen test").
EPONYM_NEXT = frozenset("""
disease diseases syndrome sign signs test tests palsy sarcoma lymphoma catheter score scale
maneuver manoeuvre reflex criteria ulcer node nodes phenomenon classification fracture procedure
operation tumor tumour disorder law ratio triad cyst body bodies cell cells method stain solution
index formula position incision repair type class grade staging lesion hernia membrane duct canal
space line point anomaly contracture neuroma neuralgia gangrene block agar equation approach
technique sheath tube murmur effect esophagus correlation coefficient exact regression model
hazards proportional analysis distribution rank criterion algorithm
university hospital hospitals county state city medical center centre college institute
clinic school foundation
""".split())

# Before "of <name>", these make it an anatomical eponym ("pouch of Douglas",
# "circle of Willis", "sphincter of Oddi", "tetralogy of Fallot").
EPONYM_OF = frozenset("""
ampulla angle bundle canal circle crypts foramen islets islands ligament loop organ pouch space
sphincter tetralogy triangle
""".split())

# Words that never start a name, even after "dr." or "doctor" in a lower-case
# transcript ("the doctor said", "doctor who").
STOPWORDS = frozenset("""
a about above absolutely after again against ago all also always am an and any appointment are
around as asked at away back be because been before being below between both but by call called
came can come could did do does doing done down during each either else even ever every few for
from gave get gets getting give given gives go goes going gone good got great had has have having
he her here hers herself him himself his how i if in into is it its itself just keep kind know
knows last later let like look looked looks made make many may me might more most much must my
myself need needs never new next no nor not now of off office ok okay on once one only or order
ordered orders other our ours out over own part please prescribed put really recommend recommended
referred right said same saw say says see sees seen she should since so some soon still such
suggested sure suspects take tell than thank that the their them then there these they think
thinks this those thought through to today told too under until up us very visit want wanted wants
was we well went were what when where which while who whom why will with would x xyz yes yet you
your yours
""".split())

# Chinese surnames for "<surname>医生 / 先生 / 女士" forms. Characters that are
# also common prepositions or verbs (向, 于, 和, 方, 高, 白 ...) are left out.
CHINESE_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔汤"
CHINESE_TITLES = ("医生", "大夫", "主任", "教授", "先生", "女士", "小姐", "护士")
