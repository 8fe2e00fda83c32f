{{/* Names and labels shared by every object of a release. */}}
{{- define "audit.name" -}}
audit-platform-{{ .Values.env }}
{{- end -}}

{{- define "audit.labels" -}}
app.kubernetes.io/name: audit-platform
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
audit-platform/env: {{ .Values.env }}
{{- end -}}

{{- define "audit.selector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "audit.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* The environment's ConfigMap, then one secret: what a container of the release reads. */}}
{{- define "audit.envFrom" -}}
- configMapRef:
    name: {{ include "audit.name" .root }}
- secretRef:
    name: {{ .secret }}
{{- end -}}

{{/* The Elasticsearch CA and a writable /tmp (the root filesystem is read-only). */}}
{{- define "audit.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.secrets.elasticsearchCa }}
- name: es-ca
  secret:
    secretName: {{ .Values.secrets.elasticsearchCa }}
{{- end }}
{{- end -}}

{{- define "audit.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.secrets.elasticsearchCa }}
- name: es-ca
  mountPath: /etc/audit-platform/es-ca
  readOnly: true
{{- end }}
{{- end -}}
