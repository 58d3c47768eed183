-- What an agent needs to mirror rules: every change since a cursor, disabled and deleted included.
begin;
\ir fixtures/world.sql
select plan(12);

insert into decision_rules (id, device_id, rule_id, rule_name, rule_json, priority, created_at) values
  ('e0000000-0000-0000-0000-000000000001', 'ESP32_ALICE_1', 'R_LOW', 'low', '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}', 10, now() - interval '3 s'),
  ('e0000000-0000-0000-0000-000000000002', 'ESP32_ALICE_1', 'R_HIGH', 'high', '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}', 90, now() - interval '2 s'),
  ('e0000000-0000-0000-0000-000000000003', 'ESP32_ALICE_1', 'R_HIGH_2', 'high too', '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}', 90, now() - interval '1 s'),
  ('e0000000-0000-0000-0000-000000000004', 'ESP32_ALICE_1', 'R_OFF', 'off', '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}', 100, now()),
  ('e0000000-0000-0000-0000-000000000005', 'ESP32_BOB_1', 'R_BOB', 'bob', '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}', 50, now());
update decision_rules set enabled = false where rule_id = 'R_OFF';

select tests.as_agent('pi-alice');
select results_eq('select rule_id from get_active_decision_rules(''ESP32_ALICE_1'', 10)',
  $$values ('R_HIGH'), ('R_HIGH_2'), ('R_LOW')$$,
  'active rules come by priority DESC, created_at ASC, without disabled ones');
select results_eq('select rule_id from get_active_decision_rules(''ESP32_ALICE_1'', 1)', $$values ('R_HIGH')$$,
  'p_limit caps the active rules');
select is((select count(*) from get_decision_rule_changes('ESP32_ALICE_1')), 4::bigint,
  'from the beginning, every rule of the master is a change, the disabled one included');
select is((select enabled from get_decision_rule_changes('ESP32_ALICE_1') where rule_id = 'R_OFF'), false,
  'a disabled rule comes through as disabled');
select is((select revision from decision_rules where rule_id = 'R_OFF'), 2::bigint, 'an update bumps the revision');

-- The cursor: nothing after the last change.
select changed_at as cursor_at, id as cursor_id from get_decision_rule_changes('ESP32_ALICE_1')
  order by changed_at desc, id desc limit 1 \gset
select is_empty(format('select * from get_decision_rule_changes(''ESP32_ALICE_1'', %L, %L)', :'cursor_at', :'cursor_id'),
  'nothing is new after the last change');
select is((select count(*) from get_decision_rule_changes('ESP32_ALICE_1', '-infinity', null, 2)), 2::bigint,
  'p_limit pages the changes');

-- Deletion by a person leaves a tombstone the agent sees.
select tests.as_alice();
delete from decision_rules where rule_id = 'R_LOW';
select tests.as_agent('pi-alice');
select results_eq('select rule_id, deleted, revision from get_decision_rule_changes(''ESP32_ALICE_1'') where deleted',
  $$values ('R_LOW'::text, true, 2::bigint)$$, 'a deleted rule comes through as a tombstone with a higher revision');
select is((select count(*) from get_decision_rule_changes('ESP32_ALICE_1') where rule_id = 'R_LOW'), 1::bigint,
  'a deleted rule appears once, as deleted');
select is((select count(*) from decision_rule_tombstones), 1::bigint, 'the agent sees its master''s tombstone');
select tests.as_bob();
select is((select count(*) from decision_rule_tombstones), 0::bigint, 'bob does not see alice''s tombstones');
select is_empty('select * from get_decision_rule_changes(''ESP32_ALICE_1'')', 'bob gets no changes of alice''s master');

select * from finish();
rollback;
