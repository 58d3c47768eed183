-- decision_rules refuses what the agent cannot compile (without runtime knowledge), naming every
-- problem with its JSON path; valid rules, the seed's among them, are stored; a row stored before
-- the check stays readable and editable in its other columns. The change feed: each table a
-- dashboard watches is in supabase_realtime with REPLICA IDENTITY FULL, and the migration re-runs.
begin;
\ir fixtures/world.sql
select plan(45);

create temporary table bad (name text, rule jsonb, message text);
insert into bad values
  ('the issue''s rule: bogus condition, explode action, not-a-mac, relay 99, duration -10',
   '{"conditions": {"type": "all", "conditions": [
       {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
       {"type": "bogus"}]},
     "actions": [{"type": "relay_on", "slave_mac_address": "not-a-mac", "relay_number": 99, "duration_seconds": -10},
                 {"type": "explode"}]}',
   'decision_rules_rule_json_invalid: unknown condition type "bogus" at conditions.conditions[1]; '
   'duration_seconds -10 out of 0..86400 at actions[0]; relay_number 99 out of 0..15 at actions[0]; '
   'MAC "not-a-mac" is not upper-case XX:XX:XX:XX:XX:XX at actions[0]; unknown action type "explode" at actions[1]'),
  ('a lower-case MAC',
   '{"conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
     "actions": [{"type": "relay_off", "slave_mac_address": "14:33:5c:38:bf:60", "relay_number": 0}]}',
   'decision_rules_rule_json_invalid: MAC "14:33:5c:38:bf:60" is not upper-case XX:XX:XX:XX:XX:XX at actions[0]'),
  ('relay 16, a duration over a day',
   '{"conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
     "actions": [{"type": "relay_on", "slave_mac_address": "14:33:5C:38:BF:60", "relay_number": 16, "duration_seconds": 86401}]}',
   'decision_rules_rule_json_invalid: duration_seconds 86401 out of 0..86400 at actions[0]; relay_number 16 out of 0..15 at actions[0]'),
  ('a fractional relay number, a string duration',
   '{"conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
     "actions": [{"type": "relay_on", "slave_mac_address": "14:33:5C:38:BF:60", "relay_number": 1.5, "duration_seconds": "60"}]}',
   'decision_rules_rule_json_invalid: duration_seconds must be a whole number, found a string at actions[0]; relay_number must be a whole number, found 1.5 at actions[0]'),
  ('negative hysteresis and held_for_seconds, a bad operator, a string value',
   '{"conditions": {"type": "any", "conditions": [
       {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "hysteresis": -0.1, "held_for_seconds": -5},
       {"type": "sensor_compare", "sensor": "ec", "operator": "=<", "value": "6.5"}]},
     "actions": [{"type": "macro", "macro_id": "flush"}]}',
   'decision_rules_rule_json_invalid: hysteresis -0.1 is negative at conditions.conditions[0]; '
   'held_for_seconds -5 out of 0..4294967295 at conditions.conditions[0]; '
   'value must be a number, found a string at conditions.conditions[1]; '
   'operator "=<" not one of < <= > >= == != at conditions.conditions[1]'),
  ('empty all, empty any, a blank sensor',
   '{"conditions": {"type": "not", "condition": {"type": "all", "conditions": [
       {"type": "any", "conditions": []}, {"type": "sensors_compare", "sensor": " ", "operator": ">", "other_sensor": "t"}]}},
     "actions": [{"type": "macro", "macro_id": "flush"}]}',
   'decision_rules_rule_json_invalid: empty any at conditions.condition.conditions[0]; empty sensor at conditions.condition.conditions[1]'),
  ('an empty all',
   '{"conditions": {"type": "all", "conditions": []}, "actions": [{"type": "macro", "macro_id": "flush"}]}',
   'decision_rules_rule_json_invalid: empty all at conditions'),
  ('a time window at 25:00 on an empty day list; a schedule without cron',
   '{"conditions": {"type": "all", "conditions": [{"type": "time_window", "from": "25:00", "to": "6:00", "days": []},
       {"type": "schedule"}]},
     "actions": [{"type": "macro", "macro_id": "flush"}]}',
   'decision_rules_rule_json_invalid: time "25:00" is not HH:MM at conditions.conditions[0]; '
   'time "6:00" is not HH:MM at conditions.conditions[0]; empty days at conditions.conditions[0]; '
   'missing field "cron" at conditions.conditions[1]'),
  ('nine levels of not',
   '{"conditions": {"type": "not", "condition": {"type": "not", "condition": {"type": "not", "condition":
       {"type": "not", "condition": {"type": "not", "condition": {"type": "not", "condition": {"type": "not", "condition":
       {"type": "not", "condition": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5}}}}}}}}},
     "actions": [{"type": "macro", "macro_id": "flush"}]}',
   'decision_rules_rule_json_invalid: nesting deeper than 8 at conditions.condition.condition.condition.condition.condition.condition.condition.condition'),
  ('unknown and missing fields, a wildcard topic, a string retain',
   '{"conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5, "unit": "pH"},
     "actions": [{"type": "mqtt_publish", "topic": "a/#", "retain": "yes"}, {"type": "relay_off", "relay_number": 0}],
     "note": "x"}',
   'decision_rules_rule_json_invalid: unknown field "note" at rule_json; unknown field "unit" at conditions; '
   'missing field "payload" at actions[0]; topic "a/#" is empty or has a wildcard at actions[0]; '
   'retain must be a boolean, found a string at actions[0]; missing field "slave_mac_address" at actions[1]'),
  ('a condition that is not an object, an action without type',
   '{"conditions": [1], "actions": [{"macro_id": "flush"}]}',
   'decision_rules_rule_json_invalid: expected a condition object, found an array at conditions; missing field "type" at actions[0]');
grant select on bad to public;

-- Alice's dashboard writes rows directly (supabase-js), so the refusals are checked as alice.
select tests.as_alice();
select throws_ok(format($$insert into decision_rules (device_id, rule_id, rule_name, rule_json)
    values ('ESP32_ALICE_1', 'R_BAD', 'bad', %L)$$, rule),
  '23514', message, 'refused by name with every problem and its path: ' || name)
from bad order by name;
select tests.as_superuser();
select is(public.rule_json_problems(rule), string_to_array(substr(message, 35), '; '),
  'rule_json_problems lists the same problems: ' || name)
from bad where name in ('a lower-case MAC', 'a time window at 25:00 on an empty day list; a schedule without cron') order by name;
-- 33 actions: the shape constraint refuses the row first; the function still says why.
select is(public.rule_json_problems(jsonb_build_object('conditions', '{"type": "schedule", "cron": "0 6 * * *"}'::jsonb,
    'actions', (select jsonb_agg('{"type": "macro", "macro_id": "flush"}'::jsonb) from generate_series(1, 33))))::text,
  '{"33 actions, 1 to 32 allowed at actions"}', 'rule_json_problems counts 33 actions');
select throws_like(format($$insert into decision_rules (device_id, rule_id, rule_name, rule_json) values ('ESP32_ALICE_1', 'R33', 'x', %L)$$,
    jsonb_build_object('conditions', '{"type": "schedule", "cron": "0 6 * * *"}'::jsonb,
      'actions', (select jsonb_agg('{"type": "macro", "macro_id": "flush"}'::jsonb) from generate_series(1, 33)))),
  '%decision_rules_rule_json_shape%', '33 actions are refused (by the shape constraint, which runs first)');

-- ---------------------------------------------------------------------------
-- Valid rules: the seed's, and every shape the agent accepts
-- ---------------------------------------------------------------------------
create temporary table good (name text, rule jsonb);
insert into good values
  ('the seed''s pH rule',
   '{"conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
     "actions": [{"type": "relay_on", "slave_mac_address": "14:33:5C:38:BF:60", "relay_number": 0, "duration_seconds": 60}]}'),
  ('every operator, hysteresis, held_for_seconds, nulls for optional fields',
   '{"conditions": {"type": "all", "held_for_seconds": 30, "conditions": [
       {"type": "sensor_compare", "sensor": "ph", "operator": "<=", "value": 6, "hysteresis": 0.2, "held_for_seconds": 10},
       {"type": "sensor_compare", "sensor": "ph", "operator": ">", "value": -1.5e2, "hysteresis": null, "held_for_seconds": null},
       {"type": "sensor_compare", "sensor": "ec", "operator": ">=", "value": 1},
       {"type": "sensor_compare", "sensor": "ec", "operator": "==", "value": 1},
       {"type": "sensor_compare", "sensor": "ec", "operator": "!=", "value": 0, "hysteresis": 0}]},
     "actions": [{"type": "relay_off", "slave_mac_address": "14:33:5C:38:BF:60", "relay_number": 15}]}'),
  ('sensors_compare with and without offset, any, not',
   '{"conditions": {"type": "any", "conditions": [
       {"type": "sensors_compare", "sensor": "temp_in", "operator": ">", "other_sensor": "temp_out", "offset": 2, "held_for_seconds": 0},
       {"type": "not", "condition": {"type": "sensors_compare", "sensor": "a", "operator": "<", "other_sensor": "b"}}]},
     "actions": [{"type": "relay_on", "slave_mac_address": "AA:BB:CC:DD:EE:FF", "relay_number": 3}]}'),
  ('time windows with and without days, a schedule',
   '{"conditions": {"type": "all", "conditions": [
       {"type": "time_window", "from": "22:00", "to": "06:00", "days": ["mon", "sun"]},
       {"type": "time_window", "from": "00:00", "to": "23:59", "days": null},
       {"type": "schedule", "cron": "*/5 * * * *"}]},
     "actions": [{"type": "relay_on", "slave_mac_address": "14:33:5C:38:BF:60", "relay_number": 0, "duration_seconds": 86400}]}'),
  ('macro and mqtt_publish actions',
   '{"conditions": {"type": "schedule", "cron": "0 0 6 * * *"},
     "actions": [{"type": "macro", "macro_id": "flush"},
                 {"type": "mqtt_publish", "topic": "farm/alerts", "payload": {"text": "hi"}, "retain": true},
                 {"type": "mqtt_publish", "topic": "farm/alerts", "payload": null}]}'),
  ('eight levels of nesting',
   '{"conditions": {"type": "not", "condition": {"type": "not", "condition": {"type": "not", "condition":
       {"type": "not", "condition": {"type": "not", "condition": {"type": "not", "condition": {"type": "not", "condition":
       {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5}}}}}}}},
     "actions": [{"type": "macro", "macro_id": "flush"}]}'),
  ('32 actions',
   jsonb_build_object('conditions', '{"type": "schedule", "cron": "0 6 * * *"}'::jsonb,
     'actions', (select jsonb_agg(jsonb_build_object('type', 'relay_off', 'slave_mac_address', '14:33:5C:38:BF:60', 'relay_number', n % 16))
                 from generate_series(1, 32) n)));
grant select on good to public;

select tests.as_alice();
select lives_ok(format($$insert into decision_rules (device_id, rule_id, rule_name, rule_json)
    values ('ESP32_ALICE_1', %L, %L, %L)$$, 'R_GOOD_' || row_number() over (order by name), left(name, 200), rule),
  'stored: ' || name)
from good order by name;
select is((select count(*) from decision_rules where rule_id like 'R_GOOD_%'), 7::bigint,
  'alice reads back every valid rule');
select is(public.rule_json_problems(rule), '{}'::text[], 'rule_json_problems finds nothing in: ' || name)
from good where name like 'the seed%';

select ok(has_function_privilege('authenticated', 'public.rule_json_problems(jsonb)', 'execute')
  and not has_function_privilege('anon', 'public.rule_json_problems(jsonb)', 'execute'),
  'a signed-in caller may check a rule without saving it; anon may not');

-- The table's own constraints still speak first, by their own names.
select throws_like($$insert into decision_rules (device_id, rule_id, rule_name, rule_json)
  values ('ESP32_ALICE_1', 'R1', 'x', '{"conditions":{"type":"bogus"},"actions":[]}')$$,
  '%decision_rules_rule_json_shape%', 'an empty action list is still the shape constraint''s refusal');

-- ---------------------------------------------------------------------------
-- A row stored before the check (triggers off, as the migration found it) stays usable
-- ---------------------------------------------------------------------------
select tests.as_superuser();
set local session_replication_role = replica;
insert into decision_rules (id, device_id, rule_id, rule_name, rule_json) values
  ('f0000000-0000-0000-0000-000000000001', 'ESP32_ALICE_1', 'R_OLD', 'stored before the check',
   '{"conditions": {"type": "bogus"}, "actions": [{"type": "explode"}]}');
set local session_replication_role = origin;
select tests.as_alice();
select is((select rule_json -> 'conditions' ->> 'type' from decision_rules where rule_id = 'R_OLD'), 'bogus',
  'an invalid row stored before the check is still readable');
select lives_ok($$update decision_rules set enabled = false, rule_name = 'disabled' where rule_id = 'R_OLD'$$,
  'the dashboard can still disable and rename it');
select tests.as_agent('pi-alice');
select lives_ok($$update decision_rules set last_error = 'unknown condition type "bogus" at conditions' where rule_id = 'R_OLD'$$,
  'the agent can still write its last_error to it');
select tests.as_alice();
select throws_ok($$update decision_rules set rule_json = '{"conditions": {"type": "bogus"}, "actions": [{"type": "relay_off"}]}' where rule_id = 'R_OLD'$$,
  '23514', 'decision_rules_rule_json_invalid: unknown condition type "bogus" at conditions; missing field "slave_mac_address" at actions[0]; missing field "relay_number" at actions[0]',
  'an edit of its rule_json must be valid');
select lives_ok($$update decision_rules set rule_json = '{"conditions": {"type": "schedule", "cron": "0 6 * * *"}, "actions": [{"type": "macro", "macro_id": "flush"}]}' where rule_id = 'R_OLD'$$,
  'an edit that fixes it is stored');

-- ---------------------------------------------------------------------------
-- The change feed
-- ---------------------------------------------------------------------------
select tests.as_superuser();
select ok(exists (select from pg_publication_tables where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = t),
  t || ' is in supabase_realtime')
from unnest(array['relay_slaves', 'device_status', 'relay_commands_slave', 'event_logs', 'system_status', 'rule_executions']) t;
select is((select relreplident from pg_class where oid = ('public.' || t)::regclass), 'f'::"char",
  t || ' has replica identity full')
from unnest(array['relay_slaves', 'device_status', 'relay_commands_slave', 'event_logs', 'system_status', 'rule_executions']) t;
select is((select count(*) from pg_publication_tables where pubname = 'supabase_realtime'), 6::bigint,
  'supabase_realtime holds those six tables and nothing else (no telemetry firehose)');

-- Re-running the migration (as on a hosted project where the tables are already members) works.
\ir ../../supabase/migrations/20261202000300_rule_validation_and_change_feed.sql
select is((select count(*) from pg_publication_tables where pubname = 'supabase_realtime'), 6::bigint,
  'a re-run of the migration leaves the publication as it was');

select * from finish();
rollback;
