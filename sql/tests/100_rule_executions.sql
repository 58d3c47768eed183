-- The engine's feedback: execution records written by the agent serving the device, rule errors
-- written back without an edit of the rule.
begin;
\ir fixtures/world.sql
select plan(14);

insert into decision_rules (id, device_id, rule_id, rule_name, rule_json) values
  ('c0000000-0000-0000-0000-000000000001', 'ESP32_ALICE_1', 'RULE_001', 'pH low',
   '{"conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5}, "actions": [{"type": "relay_on", "slave_mac_address": "14:33:5C:38:BF:60", "relay_number": 0, "duration_seconds": 60}]}'),
  ('c0000000-0000-0000-0000-000000000002', 'ESP32_BOB_1', 'RULE_B', 'bob rule',
   '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}');

create function tests.execution(p_agent text, p_device text, p_client uuid) returns void
language sql as $$
  insert into public.rule_executions (client_id, agent_id, device_id, rule_uuid, rule_id, rule_name,
    priority, executed_at, result, explanation, readings, hourly_count, hourly_max, cooldown_seconds)
  values (p_client, p_agent, p_device, 'c0000000-0000-0000-0000-000000000001', 'RULE_001', 'pH low',
    50, now(), 'executed', 'ph 6.31 < 6.5; 1/10 this hour; interlocks ok; relay 0 on 60 s',
    '[{"sensor": "ph", "value": 6.31}]', 1, 10, 60)
  on conflict (client_id) do nothing
$$;
grant execute on function tests.execution(text, text, uuid) to public;

select tests.as_agent('pi-alice');
select lives_ok($$select tests.execution('pi-alice', 'ESP32_ALICE_1', 'd0000000-0000-0000-0000-000000000001')$$,
  'the agent serving the device records an execution');
select lives_ok($$select tests.execution('pi-alice', 'ESP32_ALICE_1', 'd0000000-0000-0000-0000-000000000001')$$,
  'the same record sent again is ignored');
select throws_ok($$select tests.execution('pi-alice-2', 'ESP32_ALICE_1', 'd0000000-0000-0000-0000-000000000002')$$,
  '42501', null, 'an agent cannot record under another agent''s name');
select throws_ok($$select tests.execution('pi-alice', 'ESP32_ALICE_2', 'd0000000-0000-0000-0000-000000000003')$$,
  '42501', null, 'an agent cannot record for a device it does not serve');
select is((select count(*) from rule_executions), 1::bigint, 'the agent sees its one record');

select tests.as_alice();
select results_eq($$select rule_id, result, hourly_count from rule_executions$$,
  $$values ('RULE_001'::text, 'executed'::text, 1)$$, 'the owner sees the record in the dashboard');
select throws_ok($$select tests.execution('pi-alice', 'ESP32_ALICE_1', 'd0000000-0000-0000-0000-000000000004')$$,
  '42501', null, 'a dashboard user cannot forge an execution');
select tests.as_bob();
select is_empty($$select * from rule_executions$$, 'another owner sees nothing');

-- Errors written back.
select tests.as_agent('pi-alice');
select is(report_rule_errors('[{"id": "c0000000-0000-0000-0000-000000000001", "revision": 1, "error": "relay 7 but slave has 4 relays"}]'),
  1, 'the agent writes back why it cannot run a rule');
select tests.as_superuser();
select results_eq($$select revision, last_error from decision_rules where rule_id = 'RULE_001'$$,
  $$values (1::bigint, 'relay 7 but slave has 4 relays'::text)$$,
  'the error is shown and the rule''s revision does not move (mirrors do not reload it)');
select tests.as_agent('pi-alice');
select is(report_rule_errors('[{"id": "c0000000-0000-0000-0000-000000000001", "revision": 0, "error": "stale"}]'),
  0, 'an error about an older revision is ignored');
select is(report_rule_errors('[{"id": "c0000000-0000-0000-0000-000000000002", "revision": 1, "error": "not yours"}]'),
  0, 'an agent cannot write on another owner''s rule');
select throws_ok($$select report_rule_errors('{"id": 1}')$$, '22023', null, 'a malformed report is refused');
select tests.as_alice();
select is(report_rule_errors('[{"id": "c0000000-0000-0000-0000-000000000001", "revision": 1, "error": null}]'),
  0, 'a dashboard user is not an agent');

select * from finish();
rollback;
